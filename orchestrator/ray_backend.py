"""The ``ray`` backend: CPU workers as Ray actors, on this machine or across a cluster.

The spec's worker class becomes an actor where it is created (``ray.remote(**ACTOR_OPTIONS)``;
a class named ``"module:Class"`` is imported on the driver, and by name in the actors);
layers are sharded over the actors as in the local backend (served layer ``i`` -> actor
``i % n``), ``n`` = the cluster's CPUs over the CPUs of one actor. This is the only module
that imports Ray.

An actor cannot view the driver's host tier, so it keeps its own copy of the rows it needs,
and the driver sends each row once: a task's ``HostTier`` argument becomes ``HostRows``
carrying the rows of ``[start, stop)`` this actor was not sent before (all of them the first
time; later, the rows offloaded since) through the object store, converted to float32 from
a bfloat16 or float16 host tier (the actor's copy is float32, as the kernels are; numpy has
no bfloat16). CPU tensor arguments go as arrays.

Tasks run in two threads of the actor (its "foreground" and "background" concurrency
groups), so a task never queues behind a background one (a rebuild); each group runs its
calls in submission order and each call carries the rows it needs that earlier calls of its
group did not, or that calls the driver saw finish did, so no call reads a row that is still
on its way. One call per task: a batch's call carries the rows of all its sequences.

Faults: every result is awaited for at most ``timeout_s``. A worker that died, or did not
answer in time (it is then killed), fails the request with a :class:`WorkerError` naming the
worker and its layers; the facade then releases the request's pages. The next task for that
shard gets a new actor, empty: KV is not recovered mid-request, so a task of a sequence whose
rows died with the old actor fails with a WorkerError too (until the sequence is released).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hetero.backend import (ChainProgress, ChainResult, CPUBackend, HostRows, HostTier, Ready, WorkerError,
                            WorkerSpec)
from orchestrator.ray_address import check_address, first_line, probe_gcs, split_address

logger = logging.getLogger(__name__)

# Options of each worker actor (``ray.remote``): one CPU, numba on one thread (as the local
# pool's threads), tasks and background tasks in separate threads of the actor. Ray's
# default worker niceness (15) stays: on 2 shared cores with spinning torch threads in the
# driver, actors at niceness 0 made decode steps 2.5-4x slower (785 ms against 200-300).
ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 1,
    "concurrency_groups": {"foreground": 1, "background": 1},
    "runtime_env": {"env_vars": {"NUMBA_NUM_THREADS": "1"}},
}
# Longest wait for a worker's answer: a layer's first attention waits for its build, which
# at 16k tokens takes ~0.1 s per layer, all of an actor's layers queued before it.
TIMEOUT_S = 120.0


@dataclass(slots=True)
class _Worker:
    """The driver's handle of one actor."""

    index: int
    layers: list[int]
    actor: Any
    dead: bool = False
    lost: set[int] = field(default_factory=set)  # sequences whose rows died with an earlier actor

    def __str__(self) -> str:
        return f"CPU worker {self.index} (a Ray actor serving layers {', '.join(map(str, self.layers))})"


@dataclass(slots=True)
class _Sent:
    """The rows of one layer of one sequence an actor holds or has on their way: positions
    ``[start, lane[group])`` went with the calls of each concurrency group, ``[start,
    confirmed)`` are known to have arrived (a call that carried them finished)."""

    start: int
    lane: dict[str, int] = field(default_factory=dict)
    confirmed: int = 0

    def have(self, group: str) -> int:
        """End of the rows a new call of ``group`` finds on the actor when it runs."""
        return max(self.lane.get(group, self.start), self.confirmed, self.start)


class RayFuture:
    """A pending actor call; ``result`` waits at most the backend's ``timeout_s``; once it
    returned, the rows the call's group had sent are known to be on the actor."""

    def __init__(self, backend: RayBackend, ref: Any, worker: _Worker, what: str,
                 confirm: list[tuple[tuple[int, int], _Sent, int]] = ()):
        self._backend, self._ref, self._worker, self._what = backend, ref, worker, what
        self._actor, self._confirm = worker.actor, confirm

    def result(self, timeout: float | None = None) -> Any:
        out = self._backend._get(self._ref, self._worker, self._what, timeout, self._actor)
        for key, sent, stop in self._confirm:
            if self._backend._sent.get(key) is sent:  # not released or lost since
                sent.confirmed = max(sent.confirmed, stop)
        return out

    def done(self) -> bool:
        return _done(self._ref)


class RayBackend(CPUBackend):
    """CPU workers as Ray actors.

    Parameters
    ----------
    address : None starts a local Ray instance sized to this machine (``os.cpu_count()``
        CPUs, no dashboard, every server on the loopback interface); ``"host:port"`` (a
        cluster's GCS address, as ``ray start --head`` prints it) or ``"auto"`` (the cluster
        ``ray start`` runs on this machine) joins a cluster: a malformed address is a
        ValueError at once (:func:`check_address`), an address where no Ray GCS answers one
        within seconds (:func:`_probe_gcs`). If Ray is already initialised in the process (by
        another backend, or by the caller), it is used as it is.
    n_workers : actors; default: the cluster's CPUs over ``actor_options["num_cpus"]``.
    timeout_s : longest wait for a worker's answer before the request fails.
    actor_options : overrides of :data:`ACTOR_OPTIONS` (Ray resources and options).
    """

    name = "ray"

    def __init__(self, address: str | None = None, n_workers: int | None = None,
                 timeout_s: float = TIMEOUT_S, actor_options: dict | None = None):
        if n_workers is not None and (not isinstance(n_workers, int) or n_workers < 1):
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.n_workers, self.timeout_s = n_workers, float(timeout_s)
        self.actor_options = {**ACTOR_OPTIONS, **(actor_options or {})}
        self._owns_ray = _connect(address)
        _advise_passive_wait()
        self._spec: WorkerSpec | None = None
        self._class: type | None = None
        self._workers: list[_Worker] = []
        self._owner: dict[int, _Worker] = {}
        self._sent: dict[tuple[int, int], _Sent] = {}  # (seq, layer) -> rows sent

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        """The registry's early check: the address's syntax, before the model loads."""
        super().check(options)
        check_address(options.get("address"))

    @property
    def workers(self) -> list[_Worker]:
        return list(self._workers)

    def start(self, spec: WorkerSpec) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self._kill_workers()
        self._sent.clear()
        self._spec, self._class = spec, spec.worker_class()
        cpus = self.actor_options.get("num_cpus", 1) or 1
        n = self.n_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        self._workers = [_Worker(i, layers, None) for i, layers in enumerate(spec.shards(n))]
        for w in self._workers:
            w.actor = self._new_actor(w.layers)
        self._owner = {layer: w for w in self._workers for layer in w.layers}
        try:
            ray.get([w.actor.__ray_ready__.remote() for w in self._workers], timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError) as e:
            n = len(self._workers)
            self._kill_workers()
            raise WorkerError(
                f"{n} CPU workers ({self.actor_options.get('num_cpus', 1)} CPU each) did not start "
                f"within {self.timeout_s:g} s: the cluster has {ray.available_resources().get('CPU', 0):g} "
                f"free CPUs; pass fewer n_workers or add nodes ({type(e).__name__})") from e

    def submit(self, layer: int, task: str, *args: Any, background: bool = False,
               ready: Ready | None = None) -> RayFuture:
        w = self._worker(layer)
        if w.dead:  # a new actor, empty
            self._respawn(w)
        tiers = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, HostTier)]
        for t in tiers:
            if self._owner.get(t.layer) is not w:
                raise ValueError(f"a HostTier of layer {t.layer} goes to the worker of layer {layer}, "
                                 f"which does not serve it")
        lost = sorted({t.seq_id for t in tiers} & w.lost)
        if lost:
            raise WorkerError(f"{w} died earlier, and the rows of sequence {', '.join(map(str, lost))} "
                              f"with it: the request fails")
        if ready is not None:
            ready.wait()  # the copies into what is sent must land before it is read, here
        group = "background" if background else "foreground"
        updates: list[tuple[tuple[int, int], _Sent, int]] = []

        def send(a: Any) -> Any:
            if isinstance(a, HostTier):
                return self._carry(a, group, updates)
            if isinstance(a, (list, tuple)):
                return type(a)(send(x) for x in a)
            if isinstance(a, Tensor) and a.device.type == "cpu" and a.dtype != torch.bfloat16:
                return a.numpy()
            return a

        sent_args = [send(a) for a in args]
        ref = getattr(w.actor, task).options(concurrency_group=group).remote(*sent_args)
        for key, sent, stop in updates:  # taken only now that the call carrying them is made
            self._sent[key] = sent
            sent.lane[group] = max(sent.lane.get(group, sent.start), stop)
        seqs = sorted({t.seq_id for t in tiers})
        what = f"{task} of layer {layer}" + (
            f" (sequence{'s' * (len(seqs) > 1)} {', '.join(map(str, seqs))})" if seqs else "")
        return RayFuture(self, ref, w, what, [(key, sent, sent.lane[group]) for key, sent, _ in updates])

    def call_all(self, task: str, *args: Any) -> list[Any]:
        return self._ask_live(task, *args)

    def release(self, seq_id: int) -> None:
        """Drop ``seq_id`` on every live worker (after its pending background tasks); a
        worker that fails here is logged, not raised."""
        for key in [key for key in self._sent if key[0] == seq_id]:
            del self._sent[key]
        for w in self._workers:
            w.lost.discard(seq_id)
        calls = [(w, w.actor.release.options(concurrency_group="background").remote(seq_id))
                 for w in self._workers if not w.dead]
        for w, ref in calls:
            try:
                self._get(ref, w, f"the release of sequence {seq_id}")
            except WorkerError as e:
                logger.warning("%s", e)

    def describe(self) -> str:
        import ray

        nodes = sum(n["Alive"] for n in ray.nodes())
        cpus = ray.cluster_resources().get("CPU", 0)
        return (f"ray ({nodes} node(s), {cpus:g} CPUs, GCS {ray.get_runtime_context().gcs_address}; "
                f"{len(self._workers)} worker actors)")

    def chain_prefill(self, source: str | None, dtype: Any, token_ids: list[int], workers: int,
                      partition: str = "fitted", progress: ChainProgress | None = None) -> ChainResult:
        """The chain as Ray actors, one per part (``orchestrator.chain_part.ChainWorker``),
        spread over the cluster's nodes: each loads the model and passes its grown K/V to the
        next actor's ``push`` as an object ref (node to node through Ray's object store; this
        process sees only the last actor's result). Each actor takes
        ``actor_options["num_cpus"]`` CPUs and as many torch threads; the bounds come from
        the cost model fitted here on that many threads. ``progress`` is called as each
        worker finishes its part (actors report no single layers). The actors live for this
        prompt; one that dies or fails is a :class:`WorkerError` naming it and its tokens,
        and every actor is killed."""
        import ray

        from orchestrator.calibrate import model_config, plan_bounds
        from orchestrator.chain_part import ChainWorker

        cpus = self.actor_options.get("num_cpus", 1) or 1
        threads = max(1, int(cpus))
        ids = [int(t) for t in token_ids]
        bounds = plan_bounds(model_config(source), dtype, len(ids), workers, partition, threads)
        names = [f"chain worker {i} (a Ray actor, prompt tokens {bounds[i]}:{bounds[i + 1]})"
                 for i in range(workers)]
        actor = ray.remote(num_cpus=cpus, concurrency_groups={"compute": 1, "io": 1},
                           scheduling_strategy="SPREAD")(ChainWorker)
        t_start = time.monotonic()
        actors = [actor.remote(source, dtype, threads) for _ in range(workers)]
        try:
            (n_layers, *_) = self._chain_wait([a.n_layers.remote() for a in actors], names, "loading the model")
            t0, t_logits = time.monotonic(), [0.0]

            def finished(i: int, _: Any) -> None:
                if i == workers - 1:
                    t_logits[0] = time.monotonic()
                if progress is not None:
                    progress(i, n_layers, n_layers)

            refs = [a.run.options(concurrency_group="compute").remote(
                        ids[bounds[i]:bounds[i + 1]], bounds, i, actors[i + 1] if i + 1 < workers else None,
                        self.timeout_s) for i, a in enumerate(actors)]
            outs = self._chain_wait(refs, names, "the prefill", finished)
            ((k, v),) = self._chain_wait([actors[-1].take_kv.remote()], names[-1:], "sending the K/V")
            t_kv = time.monotonic()
        finally:
            for a in actors:
                ray.kill(a)
        k, v = (torch.from_numpy(np.array(x)).view(dtype) for x in (k, v))  # a copy: writable
        return ChainResult(ids, list(k), list(v), torch.from_numpy(np.array(outs[-1]["logits"])), bounds,
                           partition, [o["busy_s"] for o in outs], [o["wait_s"] for o in outs],
                           ttft_s=t_logits[0] - t0, startup_s=t0 - t_start, kv_s=t_kv - t_logits[0])

    def _chain_wait(self, refs: list, names: list[str], what: str, finished=None) -> list:
        """The results of ``refs`` (one per chain worker), ``finished(i, result)`` as each
        arrives; a worker that died or failed, or ``timeout_s`` without any finishing, is a
        WorkerError naming the worker."""
        import ray
        from ray.exceptions import RayActorError, RayError

        pending, results = {ref: i for i, ref in enumerate(refs)}, [None] * len(refs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not done:
                late = ", ".join(names[i] for i in sorted(pending.values()))
                raise WorkerError(f"{late} did not finish {what} within {self.timeout_s:g} s (timeout_s)")
            for ref in done:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:
                    raise WorkerError(f"{names[i]} died during {what} ({first_line(e)})") from e
                except RayError as e:
                    raise WorkerError(f"{names[i]} failed during {what}: {first_line(e)}") from e
                if finished is not None:
                    finished(i, results[i])
        return results

    def close(self) -> None:
        """Kill the actors; shut Ray down (or leave the cluster) if this backend started it
        and no other backend still uses it."""
        self._kill_workers()
        self._sent.clear()
        if self._owns_ray:
            _disconnect()
        self._owns_ray = False

    # -- internals -----------------------------------------------------------------------

    def _new_actor(self, layers: list[int]) -> Any:
        import ray

        args, kwargs = self._spec.shard_args(layers)
        return ray.remote(**self.actor_options)(self._class).remote(*args, **kwargs)

    def _respawn(self, w: _Worker) -> None:
        import ray

        logger.warning("%s died earlier: starting a new actor for its layers", w)
        ray.kill(w.actor)
        for key in [key for key in self._sent if self._owner[key[1]] is w]:
            del self._sent[key]  # its copy of the rows went with it
            w.lost.add(key[0])
        w.actor, w.dead = self._new_actor(w.layers), False

    def _carry(self, tier: HostTier, group: str, updates: list) -> HostRows:
        """``tier`` as the rows the actor lacks for a call of ``group``; the bookkeeping is
        appended to ``updates``, applied once the call is made."""
        key = (tier.seq_id, tier.layer)
        start, stop = int(tier.start), int(tier.stop)
        sent = self._sent.get(key)
        if sent is None or start < sent.start:  # rows before what was sent: send them all
            sent = _Sent(start)
        first = min(sent.have(group), stop)
        updates.append((key, sent, stop))
        return HostRows(tier.seq_id, tier.layer, start, stop, first, _send(tier.keys[:, first:stop]),
                        _send(tier.values[:, first:stop]), tier.capacity)

    def _kill_workers(self) -> None:
        import ray

        if ray.is_initialized():  # else they went with it
            for w in self._workers:
                ray.kill(w.actor)
        self._workers, self._owner = [], {}

    def _ask_live(self, method: str, *args) -> list[Any]:
        """The answers of the live workers to a bookkeeping call; one that fails is logged and
        left out (these figures are read while a failed request is cleaned up, too)."""
        calls = [(w, getattr(w.actor, method).remote(*args)) for w in self._workers if not w.dead]
        answers = []
        for w, ref in calls:
            try:
                answers.append(self._get(ref, w, method))
            except WorkerError as e:
                logger.warning("%s", e)
        return answers

    def _worker(self, layer: int) -> _Worker:
        if layer not in self._owner:
            raise ValueError(f"no worker serves layer {layer}: start the workers first "
                             f"(served: {sorted(self._owner)})")
        return self._owner[layer]

    def _get(self, ref: Any, w: _Worker, what: str, timeout: float | None = None, actor: Any = None) -> Any:
        """``ray.get`` bounded by ``timeout`` (default ``timeout_s``); a dead or silent worker
        becomes a :class:`WorkerError` (a silent one is killed). ``actor``: the actor the call
        went to, if it may have been replaced since (then only it is marked dead)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = self.timeout_s if timeout is None else timeout
        actor = w.actor if actor is None else actor
        try:
            return ray.get(ref, timeout=timeout)
        except RayActorError as e:
            w.dead = w.dead or actor is w.actor
            raise WorkerError(f"{w} died during {what}: the request fails "
                              f"({type(e).__name__}: {first_line(e)})") from e
        except GetTimeoutError as e:
            w.dead = w.dead or actor is w.actor
            ray.kill(actor)
            raise WorkerError(f"{w} did not answer {what} within {timeout:g} s (timeout_s): "
                              f"it was killed and the request fails") from e


def _advise_passive_wait() -> None:
    """torch's OpenMP threads spin between ops unless ``OMP_WAIT_POLICY=PASSIVE`` (read when
    torch loads), taking cycles from actors on the same cores; measured on 2 shared cores,
    magicpig decode steps took 566 ms spinning against 225 ms passive at 8k tokens."""
    global _advised
    if _advised or torch.get_num_threads() == 1 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return
    _advised = True
    logger.info("backend 'ray': torch's %d threads spin between ops, taking cycles from actors on "
                "the same cores; OMP_WAIT_POLICY=PASSIVE (set before Python starts) makes decode "
                "steps faster there", torch.get_num_threads())


_advised = False


def _send(rows: Tensor) -> np.ndarray:
    """Rows of a host tier as a contiguous array to send; bfloat16 and float16 rows are
    converted to float32 here (the actor's copy is float32; numpy has no bfloat16), other
    dtypes go as they are (the actor rejects them)."""
    if isinstance(rows, np.ndarray):
        rows = torch.from_numpy(rows)
    if rows.dtype in (torch.bfloat16, torch.float16):
        rows = rows.float()
    return np.ascontiguousarray(rows.numpy())


def _done(ref: Any) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


# -- joining Ray -------------------------------------------------------------------------

_users = 0  # backends using the Ray connection this module made; the last one closes it


def _connect(address: str | None) -> bool:
    """Initialise Ray for this process, or share the connection an earlier backend made;
    True if the caller must hand it back with :func:`_disconnect`. An address is checked and
    probed first (:func:`orchestrator.ray_address.probe_gcs`), even where Ray is initialised already and it goes
    unused: a wrong address is an error, never a silent fallback."""
    global _users
    host_port = split_address(address)
    try:
        import ray
    except ImportError as e:
        raise ImportError("backend 'ray' needs Ray: pip install 'hetero[ray]' (or 'ray>=2.30')") from e
    if host_port is not None:
        probe_gcs(address, *host_port)
    if ray.is_initialized():
        if _users:
            _users += 1
            return True
        if address is not None:
            logger.info("Ray is already initialised in this process: ray_address %r is not used", address)
        return False
    if address is None:
        with _loopback():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError) as e:
            raise ValueError(f"cannot join the Ray cluster at {address!r}: {first_line(e)}") from e
    _users = 1
    return True


def _disconnect() -> None:
    """Shut down the local instance (or leave the cluster) when its last backend closes."""
    global _users
    import ray

    _users -= 1
    if _users == 0 and ray.is_initialized():
        ray.shutdown()


@contextmanager
def _loopback():
    """Make a local Ray instance take 127.0.0.1 as its node address, so that its servers
    listen on the loopback interface only (Ray otherwise resolves 127.0.0.1 to the
    machine's outward address and listens on every interface)."""
    import ray
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray version: keep its default
        logger.warning("cannot keep the local Ray instance on the loopback interface with Ray %s",
                       ray.__version__)
        yield
        return
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
