"""What one worker of a chain prefill (KV-Runahead) computes: its part of the prompt, layer
by layer, exchanging K/V with its neighbours through a :class:`Link`.

Worker ``i`` of ``P`` owns the tokens ``[s_i, s_{i+1})`` (``bounds``). In each layer's
attention it receives the K and V of all earlier tokens from worker ``i - 1`` (``s_i`` rows:
the size is known from the bounds), appends its own, passes the grown K/V on to worker
``i + 1`` without waiting for it to arrive, and attends: its queries over the earlier keys
and causally over its own (:func:`part_attention`). Keys are rotated at their absolute
positions. The last worker ends with every layer's whole K/V and the last token's logits.

The links: ``orchestrator.chain`` (processes, ``torch.distributed`` send/recv) and
:class:`ChainWorker`'s (Ray actors: the next actor's ``push``, the K/V as an object ref).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from gpu_kernels import prefill_attention
from hetero.loader import load_checkpoint
from hetero.model import Transformer

PAGE = 16  # page size of the temporary paged layout part_attention reads


class Link(Protocol):
    """How a worker exchanges one layer's K/V with its neighbours."""

    def recv(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Fill ``k``, ``v`` ([s_i, Hkv, D], contiguous) with ``layer``'s K/V of the earlier
        parts (blocking)."""

    def send(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Pass ``layer``'s grown K/V ([s_{i+1}, Hkv, D], contiguous, not written again) on
        to the next worker; may return before they arrive."""

    def flush(self) -> None:
        """Wait until everything sent has arrived."""


@dataclass(slots=True)
class PartOutput:
    """A worker's part done: its busy and wait seconds; the last worker's logits [vocab]
    (float32) and whole K/V ``[L, cap, Hkv, D]`` (the first ``n`` rows of each layer hold
    the prompt's; ``cap`` rounds ``n`` up to ``PAGE``)."""

    busy_s: float
    wait_s: float
    logits: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None


def load_model(source: str | None, dtype: torch.dtype, device: torch.device | str = "cpu") -> Transformer:
    """The model as ``hetero.LLM`` builds it from ``source`` (dense weights in ``dtype``)."""
    ckpt = load_checkpoint(source, dtype)
    with torch.device("meta"):
        net = Transformer(ckpt.config)
    net = net.to_empty(device=device).to(dtype)
    net.load_hf_state_dict(ckpt.state_dict)
    return net.eval().requires_grad_(False)


def part_attention(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float) -> Tensor:
    """Attention of a part's queries over every earlier key and, causally, its own: the
    engine's ``prefill_attention`` over a temporary paged layout (one run of pages).

    Parameters
    ----------
    q : [n, Hq, D], the part's queries at positions ``start .. start+n-1``.
    k, v : [cap, Hkv, D] (``cap`` a multiple of ``PAGE``, ``>= start + n``), keys and values
        of positions ``0 .. start+n-1`` in their first rows; the rest is not read.

    Returns
    -------
    [n, Hq, D] in q's dtype; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    """
    assert k.shape[0] % PAGE == 0 and k.shape[0] >= start + q.shape[0]
    table = torch.arange(k.shape[0] // PAGE, dtype=torch.int32, device=q.device)
    return prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), table, start, scale, PAGE)[0]


def run_part(net: Transformer, ids: list[int], bounds: list[int], rank: int, link: Link,
             report=None) -> PartOutput:
    """Compute worker ``rank``'s part (``ids`` are its tokens ``[bounds[rank],
    bounds[rank+1])``) through every layer; ``report(layers_done)`` after each layer.

    Wait time is the time spent in the link (receiving, sending, flushing); busy time the
    rest of the part's wall time.
    """
    cfg, device = net.cfg, net.embed.weight.device
    start, end, last = bounds[rank], bounds[rank + 1], rank == len(bounds) - 2
    shape = (-(-end // PAGE) * PAGE, cfg.n_kv_heads, cfg.head_dim)
    dtype, scale = net.embed.weight.dtype, cfg.head_dim**-0.5
    t0, wait = time.monotonic(), [0.0]
    out = PartOutput(0.0, 0.0)
    if last:  # every layer's whole K/V: the result (allocated outside inference mode: shareable)
        out.k = torch.empty((cfg.n_layers, *shape), dtype=dtype, device=device)
        out.v = torch.empty_like(out.k)

    def timed(fn, *args) -> None:
        t = time.monotonic()
        fn(*args)
        wait[0] += time.monotonic() - t

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer and report is not None:
            report(layer)
        if last:
            kb, vb = out.k[layer], out.v[layer]
        else:
            kb = torch.empty(shape, dtype=dtype, device=device)
            vb = torch.empty_like(kb)
        if start:
            timed(link.recv, layer, kb[:start], vb[:start])
        kb[start:end], vb[start:end] = k, v
        if not last:
            timed(link.send, layer, kb[:end], vb[:end])
        return part_attention(q, kb, vb, start, scale)

    with torch.inference_mode():
        tokens = torch.tensor(ids, dtype=torch.int64, device=device)
        hidden = net(tokens, torch.arange(start, end, device=device), attend, end)
        logits = net.logits(hidden[-1:])[0] if last else None
    if last:
        out.logits = logits.cpu().clone()  # a normal tensor (not an inference one): shareable
    timed(link.flush)
    if report is not None:
        report(cfg.n_layers)
    out.wait_s = wait[0]
    out.busy_s = time.monotonic() - t0 - wait[0]
    return out


def as_bytes(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy array (a view): any dtype, bfloat16 too."""
    return t.view(torch.uint8).numpy()


class ChainWorker:
    """A chain worker as an object a Ray actor wraps (``orchestrator.ray_backend``): it loads
    the model; :meth:`run` computes its part, receiving the earlier K/V through :meth:`push`
    (called by the previous worker, concurrently with ``run``: the actor needs two
    concurrency groups, ``"compute"`` for ``run`` and ``"io"`` for ``push``) and pushing its
    grown K/V to the next worker's handle. Nothing here imports Ray: the next worker is any
    handle whose ``push.options(concurrency_group="io").remote(...)`` delivers the call.
    """

    def __init__(self, source: str | None, dtype: torch.dtype, threads: int):
        torch.set_num_threads(threads)
        self.net = load_model(source, dtype)
        self._inbox: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._arrived = threading.Condition()
        self._kv: tuple[Tensor, Tensor] | None = None

    def n_layers(self) -> int:
        return self.net.cfg.n_layers

    def push(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """The earlier parts' K/V of ``layer`` (bytes, as :func:`as_bytes` gives them)."""
        with self._arrived:
            self._inbox[layer] = (k, v)
            self._arrived.notify_all()

    def run(self, ids: list[int], bounds: list[int], rank: int, next_worker: Any,
            timeout_s: float) -> dict:
        """Compute part ``rank``; ``next_worker``: the next worker's handle (None for the
        last). Returns ``{"busy_s", "wait_s", "logits"}`` (logits: the last worker's, as
        float32 numpy, else None); the last worker keeps the K/V for :meth:`take_kv`."""
        link = _ActorLink(self, next_worker, timeout_s)
        try:  # pushes for this run may arrive before it starts: the inbox is emptied after
            out = run_part(self.net, ids, bounds, rank, link)
        finally:
            with self._arrived:
                self._inbox.clear()
        if out.k is not None:
            n = bounds[-1]
            self._kv = (out.k[:, :n], out.v[:, :n])
        logits = None if out.logits is None else out.logits.numpy()
        return {"busy_s": out.busy_s, "wait_s": out.wait_s, "logits": logits}

    def take_kv(self) -> tuple[np.ndarray, np.ndarray]:
        """The last worker's K/V ``[L, n, Hkv, D]`` as bytes (:func:`as_bytes`: the last
        axis ``D * itemsize``), forgotten here."""
        k, v = self._kv
        self._kv = None
        return as_bytes(k.contiguous()), as_bytes(v.contiguous())


class _ActorLink:
    """:class:`Link` of a :class:`ChainWorker`: the earlier K/V come through ``push``; the grown
    K/V go to the next worker's ``push`` (an object ref from this actor's node to its)."""

    def __init__(self, worker: ChainWorker, next_worker: Any, timeout_s: float):
        self.worker, self.next, self.timeout_s = worker, next_worker, timeout_s
        self.pending: list = []

    def recv(self, layer: int, k: Tensor, v: Tensor) -> None:
        w = self.worker
        with w._arrived:
            if not w._arrived.wait_for(lambda: layer in w._inbox, self.timeout_s):
                raise TimeoutError(f"no K/V of layer {layer} from the previous worker within {self.timeout_s:g} s")
            kb, vb = w._inbox.pop(layer)
        as_bytes(k)[...] = kb
        as_bytes(v)[...] = vb

    def send(self, layer: int, k: Tensor, v: Tensor) -> None:
        # the arrays are copied into the object store by .remote(): k, v may be freed after
        call = self.next.push.options(concurrency_group="io")
        self.pending.append(call.remote(layer, as_bytes(k), as_bytes(v)))

    def flush(self) -> None:
        for ref in self.pending:
            ref.future().result(self.timeout_s)
        self.pending.clear()
