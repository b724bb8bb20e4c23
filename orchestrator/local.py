"""The ``local`` backend: CPU workers in this process, their tasks run on thread pools.

The device thread submits a task (e.g. a layer's CPU attention) and goes on with its own
work (the resident-set attention of the same layer); the numba kernels release the GIL, so
the two overlap. Background tasks (e.g. a layer's table build, submitted as the layer
finishes the prompt's last prefill chunk) have their own pool, so a task never queues behind
a background one (rebuilds while decoding run in the background).

Arguments are passed by reference: a ``HostTier`` reaches the worker as it is, and the
worker reads the host tier in place. A task's ``ready`` (the device's copy event) is waited
for on the pool thread, so the submitting thread never waits for the device.

The chain prefill (``chain_prefill``: KV-Runahead) is the exception: its workers are local
processes (``orchestrator.chain``), started for the one prompt and stopped after it.

Each pool thread runs numba with one thread (``numba.set_num_threads`` is per calling
thread): parallelism comes from the pool, and on cores shared with the device's torch
threads a wide parallel kernel waits for its slowest thread (see ``cpu_kernels.lsh``).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numba

from hetero.backend import ChainProgress, ChainResult, CPUBackend, Ready, WorkerSpec

logger = logging.getLogger(__name__)


def _one_numba_thread() -> None:
    numba.set_num_threads(1)


def _new_pool(n: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix=name, initializer=_one_numba_thread)


class LocalBackend(CPUBackend):
    """Workers sharded by layer (layer ``i``-th of the served ones -> worker ``i % n``), one
    per pool thread; any thread may run any worker's task.

    Parameters
    ----------
    n_threads : size of each pool (tasks, background tasks); default ``os.cpu_count()``.
    """

    name = "local"
    in_process = True

    def __init__(self, n_threads: int | None = None):
        n = (os.cpu_count() or 1) if n_threads is None else n_threads
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n_threads must be an integer >= 1, got {n_threads!r}")
        self.n_threads = n
        self._pool: ThreadPoolExecutor | None = None  # tasks; threads start on first use
        self._build_pool: ThreadPoolExecutor | None = None  # background tasks
        self._workers: list[Any] = []
        self._owner: dict[int, Any] = {}
        self._pending: set[Future] = set()  # background tasks not done yet
        self._lock = threading.Lock()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads running tasks."""
        if self._pool is None:
            self._pool = _new_pool(self.n_threads, "hetero-task")
        return self._pool

    @property
    def build_pool(self) -> ThreadPoolExecutor:
        """Threads running background tasks."""
        if self._build_pool is None:
            self._build_pool = _new_pool(self.n_threads, "hetero-background")
        return self._build_pool

    @property
    def workers(self) -> list[Any]:
        return list(self._workers)

    def start(self, spec: WorkerSpec) -> None:
        self._drain()
        cls = spec.worker_class()
        self._workers, self._owner = [], {}
        for layers in spec.shards(self.n_threads):
            args, kwargs = spec.shard_args(layers)
            worker = cls(*args, **kwargs)
            self._workers.append(worker)
            self._owner.update(dict.fromkeys(layers, worker))

    def submit(self, layer: int, task: str, *args: Any, background: bool = False,
               ready: Ready | None = None) -> Future:
        method = getattr(self.worker(layer), task)
        if not background:
            return self.pool.submit(_run, method, args, ready)
        future = self.build_pool.submit(_run, method, args, ready)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def call_all(self, task: str, *args: Any) -> list[Any]:
        answers = []
        for w in self._workers:
            try:
                answers.append(getattr(w, task)(*args))
            except Exception as e:  # noqa: BLE001 - bookkeeping: logged, left out
                logger.warning("CPU worker %s failed %s: %s", w, task, e)
        return answers

    def release(self, seq_id: int) -> None:
        self._drain()
        for w in self._workers:
            try:
                w.release(seq_id)
            except Exception as e:  # noqa: BLE001
                logger.warning("CPU worker %s failed to release sequence %d: %s", w, seq_id, e)

    def describe(self) -> str:
        return f"local ({self.n_threads} threads)"

    def chain_prefill(self, source: str | None, dtype: Any, token_ids: list[int], workers: int,
                      partition: str = "fitted", progress: ChainProgress | None = None) -> ChainResult:
        """The chain as local processes (``orchestrator.chain``, gloo), each on the machine's
        cores over ``workers`` threads; the parts from ``orchestrator.calibrate.plan_bounds``
        (the cost model fitted once per model, dtype and thread count, then cached). The
        result's ``startup_s`` is the workers' start-up (spawn, model load, connect)."""
        from orchestrator.calibrate import model_config, plan_bounds
        from orchestrator.chain import Chain, threads_per_worker

        threads = threads_per_worker(workers)
        bounds = plan_bounds(model_config(source), dtype, len(token_ids), workers, partition, threads)
        with Chain(source, dtype, workers, threads=threads) as chain:
            result = chain.prefill(token_ids, bounds, progress, partition)
        result.startup_s = chain.startup_s
        return result

    def close(self) -> None:
        self._drain()
        for pool in (self._pool, self._build_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._build_pool = None

    def worker(self, layer: int) -> Any:
        """The worker (an instance of the spec's class, in this process) that owns ``layer``."""
        if layer not in self._owner:
            raise ValueError(f"no worker serves layer {layer}: start the workers first "
                             f"(served: {sorted(self._owner)})")
        return self._owner[layer]

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _drain(self) -> None:
        """Wait for the pending background tasks; their errors stay with their futures."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()


def _run(method, args: tuple, ready: Ready | None) -> Any:
    if ready is not None:
        ready.wait()
    return method(*args)
