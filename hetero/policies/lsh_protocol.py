"""MagicPIG's worker protocol: what the policy asks of the CPU workers that hold the LSH
tables, over any backend (``hetero.backend``).

The workers (``orchestrator.lsh_worker.LSHWorker``, named by :data:`WORKER`) serve the sparse
layers, sharded by layer; :class:`LSHSpec` is what they are created with. Their tasks:

- ``build(host)`` (a background task): the tables of one layer of one sequence over the
  offloaded positions ``[host.start, host.stop)`` of its host tier (:class:`HostTier`);
  a rebuild replaces them, a build older than the tables it would replace is dropped;
- ``attend(q, q_codes, host)`` / ``attend_batch(q, q_codes, hosts)``: the partial
  ``(out, lse)`` of queries over the offloaded positions ``[lo, host.stop)``, sampled
  through the tables where they reach, exact beyond (rows offloaded since the build);
- ``table_bytes(seq_id)``, ``key_counts()``, ``release(seq_id)``: bookkeeping.

:class:`LSHClient` is the driver's side: it remembers each sequence's host tier, waits for a
layer's first build before its first attention call, raises a failed build's error at the
next attention call, and makes one call per layer and step for a batch (split per sequence
over an in-process pool's threads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hetero.backend import CPUBackend, Future, HostTier, Ready, WorkerSpec

WORKER = "orchestrator.lsh_worker:LSHWorker"


@dataclass(frozen=True, slots=True)
class LSHSpec:
    """What CPU workers need to hash keys and sample them (MagicPIG).

    Attributes
    ----------
    k, l : bits per table and number of tables.
    scale : softmax scale (``head_dim ** -0.5``).
    projections : layer -> ``R`` [D, K*L] float32, the random Gaussian projection of the
        layer; only the layers listed are served (the sparse ones).
    """

    k: int
    l: int
    scale: float
    projections: dict[int, np.ndarray]

    @property
    def layers(self) -> list[int]:
        return sorted(self.projections)

    def worker_spec(self, worker: str | type = WORKER) -> WorkerSpec:
        """The backend's description of the workers: ``worker(projections of its layers, k,
        l, scale)``."""
        return WorkerSpec(worker, self.projections, (self.k, self.l, self.scale))


class LSHClient:
    """MagicPIG's calls to the workers of ``backend`` (started here from ``spec``).

    Futures of :meth:`attend` give ``(out [n, Hq, D], lse [n, Hq])`` float32 CPU tensors
    (``lse = -inf`` and ``out = 0`` where nothing is offloaded); of :meth:`build`, None.
    """

    def __init__(self, backend: CPUBackend, spec: LSHSpec, worker: str | type = WORKER):
        backend.start(spec.worker_spec(worker))
        self.backend, self.spec = backend, spec
        self._tiers: dict[tuple[int, int], tuple[Tensor, Tensor, int]] = {}  # keys, values, lo
        self._builds: dict[tuple[int, int], Future] = {}  # latest build, until its error is seen
        self._waited: set[tuple[int, int]] = set()  # layers whose first build was waited for

    def build(self, seq_id: int, layer: int, keys: Tensor, values: Tensor, lo: int, hi: int,
              ready: Ready | None = None) -> Future:
        """Build (or rebuild) the tables of one layer of ``seq_id`` over key positions
        ``[lo, hi)``, in the background.

        ``keys``, ``values`` are the layer's host tier, ``[Hkv, capacity, D]`` CPU tensors
        (float32, bfloat16 or float16) indexed by token position; ``ready`` is waited for
        before they are read (the copies into them issued so far). They are kept: later
        attention calls read the positions offloaded since from them.
        """
        key = (seq_id, layer)
        future = self.backend.submit(layer, "build", HostTier(seq_id, layer, keys, values, lo, hi),
                                     background=True, ready=ready)
        self._tiers[key], self._builds[key] = (keys, values, lo), future
        return future

    def attend(self, layer: int, seq_ids: list[int], q: Tensor, q_codes: Tensor, his: list[int],
               ready: Ready | None = None) -> Future:
        """Attention of one layer for a batch: ``q[i]`` [Hq, D] (float32, CPU) with codes
        ``q_codes[i]`` [Hq, L] over the offloaded positions ``[lo, his[i])`` of sequence
        ``seq_ids[i]``; ``ready`` is waited for before ``q``, ``q_codes`` and the host tier
        are read. Waits here for a layer's first build if it is still running; a build that
        failed raises its error here (once)."""
        tiers = []
        for seq_id, hi in zip(seq_ids, his):
            key = (seq_id, layer)
            if key not in self._tiers:
                raise ValueError(f"no LSH tables for sequence {seq_id}, layer {layer}: build first")
            build = self._builds.get(key)
            if build is not None:
                if key not in self._waited:  # the first build: nothing to sample before it
                    self._waited.add(key)
                    build.result()
                if build.done():
                    del self._builds[key]
                    build.result()  # raises a failed build's error here, once
            keys, values, lo = self._tiers[key]
            tiers.append(HostTier(seq_id, layer, keys, values, lo, hi))
        if self.backend.in_process:  # one task per sequence: the pool's threads share a batch
            return _Stacked([self.backend.submit(layer, "attend", q[i], q_codes[i], tier, ready=ready)
                             for i, tier in enumerate(tiers)])
        return _Tensors(self.backend.submit(layer, "attend_batch", q, q_codes, tiers, ready=ready))

    def release(self, seq_id: int) -> None:
        """Drop every table of ``seq_id`` (the backend runs it after the pending builds)."""
        for table in (self._tiers, self._builds):
            for key in [key for key in table if key[0] == seq_id]:
                del table[key]
        self._waited = {key for key in self._waited if key[0] != seq_id}
        self.backend.release(seq_id)

    def table_bytes(self, seq_id: int | None = None) -> dict[int, int]:
        """Bytes of LSH state (tables, key norms, centres) per served layer, of one sequence
        or of all; a dead worker's layers hold nothing (0)."""
        out = dict.fromkeys(self.spec.layers, 0)
        for part in self.backend.call_all("table_bytes", seq_id):
            out.update({int(layer): int(n) for layer, n in part.items()})
        return out

    def key_counts(self) -> tuple[int, int]:
        """Keys read by the workers' attention calls (sampled candidates and exact tail),
        and offloaded keys they could have read; both summed over query heads and calls
        since the workers started (a dead worker's counts are lost with it)."""
        counts = self.backend.call_all("key_counts")
        return sum(int(r) for r, _ in counts), sum(int(o) for _, o in counts)


class _Stacked:
    """The futures of a batch's per-sequence calls as one: ``(out, lse)`` stacked."""

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def result(self, timeout: float | None = None) -> tuple[Tensor, Tensor]:
        parts = [f.result(timeout) for f in self._futures]
        return torch.stack([out for out, _ in parts]), torch.stack([lse for _, lse in parts])

    def done(self) -> bool:
        return all(f.done() for f in self._futures)


class _Tensors:
    """A future whose result is arrays (a remote worker's), as CPU tensors (copied: arrays
    from another process may be read-only views)."""

    def __init__(self, future: Future):
        self._future = future

    def result(self, timeout: float | None = None) -> tuple[Tensor, ...]:
        return tuple(_tensor(a) for a in self._future.result(timeout))

    def done(self) -> bool:
        return self._future.done()


def _tensor(a: Any) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(np.array(a))
