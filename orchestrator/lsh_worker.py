"""A CPU worker for MagicPIG: LSH tables over a sequence's offloaded keys, sampled attention.

The worker owns, for a shard of layers and per sequence, the LSH state of the offloaded
keys of each KV head: the centre (mean of the offloaded keys), the centred key norms and
L hash tables of K-bit SimHash buckets (``cpu_kernels.lsh``). It implements the tasks of
MagicPIG's protocol (``hetero.policies.lsh_protocol``). It reads the rows it samples from the
layer's host tier (``[Hkv, capacity, D]``, indexed by token position), which its tasks
receive as a ``hetero.backend.HostTier`` or ``HostRows`` argument, either:

- views of a float32 host tier (``KVStore.host[seq]``, a ``HostTier``): nothing is copied (a
  worker in the process, ``orchestrator.local``);
- its own float32 copy, filled from the ``HostRows`` that ``build`` and ``attend`` receive
  (a worker in another process or on another node, ``orchestrator.ray_backend``); or
- its own float32 copy, converted from views of a bfloat16 or float16 host tier (a
  ``HostTier``; the kernels have a float32 path only): rows ``[0, hi)`` at the build, rows
  offloaded later as the first attention call that reads them converts them. The copy
  costs 4 bytes per element besides the host tier's 2 (committed as rows are converted).

Positions ``[lo, hi)`` offloaded when the tables were built are sampled through them.
Positions offloaded later (while decoding, a page at a time) are few: they are attended
exactly and merged, so no offloaded token is ever skipped. The caller rebuilds the tables
when that tail grows.

A plain class: no threads, no locks, no Ray. ``orchestrator.local`` runs its calls on a
thread pool; ``orchestrator.ray_backend`` wraps it as an actor. Either way a build may run
while an attention call of another layer (or of the same layer, over the previous tables)
does: a build replaces a layer's state in one assignment. Two calls converting the same
half rows at once write the same values, and the converted bound only grows once rows
are written, so neither needs a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cpu_kernels import LSHTables, build_tables, centred_norms, lsh_attention, simhash_codes
from gpu_kernels import merge_partials
from hetero.backend import HostRows, HostTier


@dataclass(frozen=True, slots=True)
class LayerLSH:
    """LSH state of one layer of one sequence.

    Attributes
    ----------
    keys, values : [Hkv, capacity, D] float32: views of the host tier, or the worker's copy.
    source : the half-precision host tier the copy is converted from, or None.
    mean : [Hkv, D] float32, the centre of the keys in ``[lo, hi)``.
    norms : [Hkv, hi] float32, ``|k - mean|`` (0 below ``lo``).
    tables : ids over positions ``0..hi-1``; positions below ``lo`` are in bucket 0 and
        never sampled (the device holds the sinks).
    lo, hi : the positions the tables sample.
    """

    keys: np.ndarray
    values: np.ndarray
    mean: np.ndarray
    norms: np.ndarray
    tables: LSHTables
    lo: int
    hi: int
    source: _HalfSource | None = None

    @property
    def nbytes(self) -> int:
        return self.tables.nbytes + self.norms.nbytes + self.mean.nbytes


class _HalfSource:
    """Views of a bfloat16 or float16 host tier of one layer and the worker's float32 copy
    they are converted into, rows ``[0, converted)`` so far."""

    __slots__ = ("keys", "values", "copy", "converted")

    def __init__(self, keys: Tensor, values: Tensor, copy: tuple[np.ndarray, np.ndarray]):
        self.keys, self.values, self.copy, self.converted = keys, values, copy, 0

    def convert(self, hi: int) -> None:
        """Convert rows ``[converted, hi)`` into the copy (torch: numpy has no bfloat16)."""
        start = self.converted
        if hi <= start:
            return
        for src, dst in zip((self.keys, self.values), self.copy):
            torch.from_numpy(dst[:, start:hi]).copy_(src[:, start:hi])
        # after the rows: a reader that sees the bound finds them written
        self.converted = max(self.converted, hi)


class LSHWorker:
    """LSH tables and sampled attention for the layers ``projections`` lists.

    Parameters
    ----------
    projections : layer -> ``R`` [D, K*L] float32, the layer's random Gaussian projection.
    k, l : bits per table (0..16) and number of tables (>= 2).
    scale : softmax scale.
    """

    def __init__(self, projections: Mapping[int, np.ndarray], k: int, l: int, scale: float):
        if not 0 <= k <= 16:
            raise ValueError(f"k (bits per table) must be in [0, 16], got {k}")
        if l < 2:
            raise ValueError(f"l (tables) must be >= 2: keys are sampled on >= 2 collisions, got {l}")
        self.projections = {int(layer): np.ascontiguousarray(r, dtype=np.float32)
                            for layer, r in projections.items()}
        for layer, r in self.projections.items():
            if r.ndim != 2 or r.shape[1] != k * l:
                raise ValueError(f"projection of layer {layer} must be [D, K*L={k * l}], got {r.shape}")
        self.k, self.l, self.scale = k, l, float(scale)
        self.state: dict[tuple[int, int], LayerLSH] = {}
        self.copies: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # own host tier
        self.sources: dict[tuple[int, int], _HalfSource] = {}  # half host tiers of the copies
        self.keys_read = 0  # summed over query heads and calls
        self.keys_offloaded = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.projections)

    def build(self, host: HostTier | HostRows) -> None:
        """Build the tables of one layer of one sequence over the offloaded positions
        ``[host.start, host.stop)`` (the task ``build``).

        ``host`` names the sequence and layer and gives the host tier: a :class:`HostTier`
        of ``[Hkv, capacity, D]`` CPU tensors (or arrays), float32 and C-contiguous, kept as
        views, or bfloat16 / float16 (both the same), kept as views and converted into the
        worker's own float32 copy as rows are needed; or :class:`HostRows`, stored into the
        worker's own copy first.

        A build older than the state it would replace (smaller ``stop``) is dropped.
        """
        seq_id, layer = _key(host)
        r = self._projection(layer)
        keys, values, source = self._host_tier(host)
        lo, hi = int(host.start), int(host.stop)
        hkv, cap, d = keys.shape
        if values.shape != keys.shape or r.shape[0] != d:
            raise ValueError(f"keys {keys.shape} and values {values.shape} must be [Hkv, capacity, D] "
                             f"with D = {r.shape[0]}")
        if not 0 <= lo <= hi <= cap:
            raise ValueError(f"offloaded positions [{lo}, {hi}) must lie in [0, capacity={cap}]")
        if source is not None:
            source.convert(hi)
        rows = keys[:, lo:hi]  # a view
        mean = (rows.mean(axis=1, dtype=np.float64) if hi > lo else np.zeros((hkv, d))).astype(np.float32)
        norms = np.zeros((hkv, hi), dtype=np.float32)
        codes = np.zeros((hkv, hi, self.l), dtype=np.uint16)
        if hi > lo:
            norms[:, lo:] = centred_norms(rows, mean)
            codes[:, lo:] = simhash_codes(rows, r, self.k, self.l, center=mean)
        state = LayerLSH(keys, values, mean, norms, build_tables(codes, self.k), lo, hi, source)
        old = self.state.get((seq_id, layer))
        if old is None or old.hi <= hi:
            self.state[(seq_id, layer)] = state

    def has(self, seq_id: int, layer: int) -> bool:
        return (seq_id, layer) in self.state

    def attend(self, q: Tensor | np.ndarray, q_codes: Tensor | np.ndarray,
               host: HostTier | HostRows) -> tuple[Tensor, Tensor]:
        """Attention of ``q`` over the offloaded positions ``[lo, host.stop)`` of the
        sequence and layer ``host`` names (the task ``attend``).

        Parameters
        ----------
        q : [Hq, D] float32 queries (uncentred); q_codes : [Hq, L] integer SimHash codes of
            ``q`` with the layer's projection and no centre.
        host : the layer's host tier up to the end of the offloaded positions now; positions
            from the build's ``hi`` on are attended exactly. :class:`HostRows` (rows offloaded
            since the build) are stored into the worker's own copy first; a :class:`HostTier`
            is read through the views kept at the build.

        Returns
        -------
        out : [Hq, D] float32; lse : [Hq] float32 (natural log): a partial over the
        offloaded keys that merges with the device's (``-inf`` and 0 if there are none).
        """
        seq_id, layer = _key(host)
        st = self.state.get((seq_id, layer))
        if st is None:
            raise ValueError(f"no LSH tables for sequence {seq_id}, layer {layer}: call build first")
        if isinstance(host, HostRows):
            self._receive(host)
        hi = int(host.stop)
        if not st.hi <= hi <= st.keys.shape[1]:
            raise ValueError(f"the offloaded positions end at {hi}: that must lie in [{st.hi}, "
                             f"{st.keys.shape[1]}] (the tables cover positions up to {st.hi})")
        if st.source is not None:
            st.source.convert(hi)  # rows offloaded since the build
        q = np.array(_numpy(q), dtype=np.float32, order="C")  # writable: torch reads it
        hq = q.shape[0]
        parts = []
        if st.hi > st.lo:
            counts = np.empty(hq, dtype=np.int32)
            out, lse = lsh_attention(q, _numpy(q_codes), st.keys, st.values, st.norms, st.mean, st.tables,
                                     self.scale, st.lo, st.hi, n_candidates=counts)
            parts.append((torch.from_numpy(out), torch.from_numpy(lse)))
            self.keys_read += int(counts.sum())
        if hi > st.hi:
            parts.append(_exact(q, st.keys[:, st.hi:hi], st.values[:, st.hi:hi], self.scale))
            self.keys_read += hq * (hi - st.hi)
        self.keys_offloaded += hq * (hi - st.lo)
        if not parts:
            return torch.zeros(q.shape, dtype=torch.float32), torch.full((hq,), float("-inf"))
        return merge_partials(*parts)

    def attend_batch(self, q: np.ndarray, q_codes: np.ndarray,
                     hosts: list[HostTier | HostRows]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`attend` for each sequence of a batch, as one call (the task
        ``attend_batch``: one remote call per layer and step): ``q`` [n, Hq, D], ``q_codes``
        [n, Hq, L], ``hosts`` per sequence. Returns ``out`` [n, Hq, D] and ``lse`` [n, Hq]
        as arrays, which Ray passes without pickling."""
        parts = [self.attend(q[i], q_codes[i], host) for i, host in enumerate(hosts)]
        return np.stack([out.numpy() for out, _ in parts]), np.stack([lse.numpy() for _, lse in parts])

    def release(self, seq_id: int) -> None:
        """Drop the state of every layer of ``seq_id`` (the views or copy of its host tier too)."""
        for table in (self.state, self.copies, self.sources):
            for key in [key for key in table if key[0] == seq_id]:
                del table[key]

    def key_counts(self) -> tuple[int, int]:
        """Keys read by attention calls and offloaded keys they could have read, summed over
        query heads and calls."""
        return self.keys_read, self.keys_offloaded

    def table_bytes(self, seq_id: int | None = None) -> dict[int, int]:
        """Bytes of LSH state (tables, norms, centres) per layer, of ``seq_id`` or of all."""
        out = dict.fromkeys(self.layers, 0)
        for (s, layer), st in list(self.state.items()):
            if seq_id is None or s == seq_id:
                out[layer] += st.nbytes
        return out

    def _host_tier(self, host: HostTier | HostRows) -> tuple[np.ndarray, np.ndarray, _HalfSource | None]:
        """The float32 keys and values ``host`` stands for (views, or the worker's copy) and
        the half-precision source the copy is converted from, if any."""
        seq_id, layer = _key(host)
        if isinstance(host, HostRows):
            self._receive(host)
            keys, values = self.copies[(seq_id, layer)]
            source = self.sources.get((seq_id, layer))
        else:
            keys, values = host.keys, host.values
            source = self._half_source(seq_id, layer, keys, values)
        if source is not None:
            keys, values = source.copy
        return _host_rows(keys, "keys"), _host_rows(values, "values"), source

    def _receive(self, rows: HostRows) -> None:
        """Store rows ``[first, stop)`` into the worker's copy of the layer's host tier
        (allocated on the first rows of the sequence)."""
        seq_id, layer = int(rows.seq_id), int(rows.layer)
        keys, values = _numpy(rows.keys), _numpy(rows.values)
        if keys.dtype != np.float32 or values.dtype != np.float32:
            raise TypeError(f"rows must be float32 (the CPU kernels have no other path), got keys "
                            f"{keys.dtype}, values {values.dtype}")
        start, cap = int(rows.first), int(rows.capacity)
        copy = self.copies.get((seq_id, layer))
        if copy is None:
            hkv, _, d = keys.shape
            copy = self.copies[(seq_id, layer)] = (np.zeros((hkv, cap, d), np.float32),
                                                   np.zeros((hkv, cap, d), np.float32))
        n = keys.shape[1]
        if values.shape != keys.shape or keys.shape[::2] != copy[0].shape[::2]:
            raise ValueError(f"rows of keys {keys.shape} and values {values.shape} must be "
                             f"[Hkv, n, D] like the copy {copy[0].shape}")
        if not 0 <= start <= start + n <= copy[0].shape[1]:
            raise ValueError(f"rows [{start}, {start + n}) must lie in [0, capacity={copy[0].shape[1]}]")
        copy[0][:, start:start + n] = keys
        copy[1][:, start:start + n] = values

    def _half_source(self, seq_id: int, layer: int, keys: Tensor | np.ndarray,
                     values: Tensor | np.ndarray) -> _HalfSource | None:
        """The layer's half-precision source if ``keys`` and ``values`` are a bfloat16 or
        float16 host tier (its copy allocated on the first build), else None."""
        k, v = _half(keys), _half(values)
        if k is None and v is None:
            return None
        if k is None or v is None or k.dtype != v.dtype:
            raise TypeError(f"keys and values must have one dtype, got {keys.dtype} and {values.dtype}")
        if k.ndim != 3 or v.shape != k.shape or k.device.type != "cpu" or v.device.type != "cpu":
            raise TypeError(f"keys and values must be a [Hkv, capacity, D] host tier on the CPU, got "
                            f"{tuple(k.shape)} on {k.device} and {tuple(v.shape)} on {v.device}")
        source = self.sources.get((seq_id, layer))
        if source is not None and source.keys.shape == k.shape:
            source.keys, source.values = k, v  # new views of the same tier: the copy stays
            return source
        copy = self.copies[(seq_id, layer)] = (np.zeros(k.shape, np.float32), np.zeros(k.shape, np.float32))
        source = self.sources[(seq_id, layer)] = _HalfSource(k, v, copy)
        return source

    def _projection(self, layer: int) -> np.ndarray:
        if layer not in self.projections:
            raise ValueError(f"layer {layer} is not served by this worker (layers {self.layers})")
        return self.projections[layer]


def _key(host: HostTier | HostRows) -> tuple[int, int]:
    """The sequence and layer a host argument names."""
    if not isinstance(host, (HostTier, HostRows)):
        raise TypeError(f"host must be a HostTier or HostRows, got {type(host).__name__}")
    return int(host.seq_id), int(host.layer)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else np.asarray(x)


def _half(x: Tensor | np.ndarray) -> Tensor | None:
    """``x`` as a tensor if it is bfloat16 or float16, else None."""
    if isinstance(x, Tensor):
        return x if x.dtype in (torch.bfloat16, torch.float16) else None
    return torch.from_numpy(x) if isinstance(x, np.ndarray) and x.dtype == np.float16 else None


def _host_rows(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    a = _numpy(x)
    if a.ndim != 3 or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a [Hkv, capacity, D] host tier, C-contiguous float32 (read in "
                        f"place) or bfloat16 / float16 (converted), got {a.dtype} {a.shape}")
    return a


def _exact(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    """Exact partial of ``q`` [Hq, D] over ``keys``, ``values`` [Hkv, T, D] (GQA by groups)."""
    hkv, _, d = keys.shape
    qg = torch.from_numpy(q).view(hkv, -1, d)
    k, v = torch.from_numpy(keys), torch.from_numpy(values)
    logits = torch.matmul(qg, k.transpose(1, 2)).mul_(scale)  # [Hkv, G, T]
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), v)
    return out.reshape(q.shape), lse.reshape(-1)
