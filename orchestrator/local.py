"""The ``local`` backend: CPU workers in this process, their calls run on a thread pool.

The device thread submits a layer's CPU attention and goes on with the resident-set
attention of the same layer; the numba kernels release the GIL, so the two overlap.
A layer's table build is submitted as the layer finishes the prompt's last prefill chunk and
runs while the device goes on with the next layers, samples the first token and starts
decoding (a layer's first attention waits for that layer's build only). Builds have their
own pool, so an attention call never queues behind a build (rebuilds while decoding run in
the background).

Each pool thread runs numba with one thread (``numba.set_num_threads`` is per calling
thread): parallelism comes from the pool, and on cores shared with the device's torch
threads a wide parallel kernel waits for its slowest thread (see ``cpu_kernels.lsh``).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numba
import torch
from torch import Tensor

from hetero.backend import CPUBackend, LSHSpec
from orchestrator.lsh_worker import LSHWorker


class _Stacked:
    """The futures of a batch's per-sequence calls as one: ``(out, lse)`` stacked."""

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def result(self, timeout: float | None = None) -> tuple[Tensor, Tensor]:
        parts = [f.result(timeout) for f in self._futures]
        return torch.stack([out for out, _ in parts]), torch.stack([lse for _, lse in parts])

    def done(self) -> bool:
        return all(f.done() for f in self._futures)


def _one_numba_thread() -> None:
    numba.set_num_threads(1)


def _new_pool(n: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix=name, initializer=_one_numba_thread)


class LocalBackend(CPUBackend):
    """Workers sharded by layer (layer ``i``-th of the served ones -> worker ``i % n``), one
    per pool thread; any thread may run any worker's call.

    Parameters
    ----------
    n_threads : pool size; default ``os.cpu_count()``.
    """

    name = "local"

    def __init__(self, n_threads: int | None = None):
        n = (os.cpu_count() or 1) if n_threads is None else n_threads
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n_threads must be an integer >= 1, got {n_threads!r}")
        self.n_threads = n
        self._pool: ThreadPoolExecutor | None = None  # attention; threads start on first use
        self._build_pool: ThreadPoolExecutor | None = None
        self._workers: list[LSHWorker] = []
        self._owner: dict[int, LSHWorker] = {}
        self._builds: dict[tuple[int, int], Future] = {}  # latest build of (seq, layer)

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads running attention calls."""
        if self._pool is None:
            self._pool = _new_pool(self.n_threads, "hetero-attend")
        return self._pool

    @property
    def build_pool(self) -> ThreadPoolExecutor:
        """Threads running table builds."""
        if self._build_pool is None:
            self._build_pool = _new_pool(self.n_threads, "hetero-build")
        return self._build_pool

    def start_lsh(self, spec: LSHSpec) -> None:
        self._wait_builds()
        layers = spec.layers
        n = min(self.n_threads, len(layers)) or 1
        shards = [{layer: spec.projections[layer] for layer in layers[i::n]} for i in range(n)]
        self._workers = [LSHWorker(shard, spec.k, spec.l, spec.scale) for shard in shards]
        self._owner = {layer: w for w in self._workers for layer in w.layers}

    def submit_build(self, seq_id: int, layer: int, keys: Tensor, values: Tensor, lo: int, hi: int) -> Future:
        worker = self._worker(layer)
        future = self.build_pool.submit(worker.build, seq_id, layer, keys, values, lo, hi)
        self._builds[(seq_id, layer)] = future
        return future

    def submit_attend(self, layer: int, seq_ids: list[int], q: Tensor, q_codes: Tensor,
                      his: list[int]) -> Future:
        worker = self._worker(layer)
        for seq_id in seq_ids:
            build = self._builds.get((seq_id, layer))
            if build is None:
                continue
            if not worker.has(seq_id, layer):  # the first build: nothing to sample yet
                build.result()
            if build.done():
                build.result()  # raises a failed build's error here, once
                del self._builds[(seq_id, layer)]
        # one task per sequence: the pool's threads share a batch's layer
        return _Stacked([self.pool.submit(worker.attend, seq_id, layer, q[i], q_codes[i], his[i])
                         for i, seq_id in enumerate(seq_ids)])

    def release(self, seq_id: int) -> None:
        self._wait_builds(seq_id)
        for w in self._workers:
            w.release(seq_id)

    def table_bytes(self, seq_id: int | None = None) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self._workers:
            out.update(w.table_bytes(seq_id))
        return out

    def key_counts(self) -> tuple[int, int]:
        counts = [w.key_counts() for w in self._workers]
        return sum(r for r, _ in counts), sum(o for _, o in counts)

    def describe(self) -> str:
        return f"local ({self.n_threads} threads)"

    def close(self) -> None:
        self._wait_builds()
        for pool in (self._pool, self._build_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._build_pool = None

    def _worker(self, layer: int) -> LSHWorker:
        if layer not in self._owner:
            raise ValueError(f"no worker serves layer {layer}: start_lsh first (served: {sorted(self._owner)})")
        return self._owner[layer]

    def _wait_builds(self, seq_id: int | None = None) -> None:
        """Wait for pending builds (of one sequence or all); errors are dropped with them."""
        for key in [key for key in self._builds if seq_id is None or key[0] == seq_id]:
            self._builds.pop(key).exception()
