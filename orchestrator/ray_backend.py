"""The ``ray`` backend: CPU workers as Ray actors, on this machine or across a cluster.

The plain :class:`orchestrator.lsh_worker.LSHWorker` becomes an actor where it is created
(``ray.remote(**ACTOR_OPTIONS)``); layers are sharded over the actors as in the local
backend (served layer ``i`` -> actor ``i % n``), ``n`` = the cluster's CPUs over the CPUs of
one actor. This is the only module that imports Ray.

An actor cannot view the driver's host tier, so it keeps its own copy of its layers'
offloaded KV, and the driver sends each row once with the call that first needs it:

- a build sends the rows its tables cover that earlier builds did not (all of ``[lo, hi)``
  the first time, the tail since the previous build on a rebuild) through the object
  store, which the actor reads without a copy and stores into its own arrays;
- an attention call sends the pages offloaded since the previous call of that layer (one
  page every ``page_size`` steps) inline with q and its codes: one call per layer and step
  for the whole batch.

Rows of a bfloat16 or float16 host tier are converted to float32 on the driver as they are
sent (the actor's copy is float32, as the kernels are); q is float32 already.

Builds and attention calls run in two threads of the actor (its "build" and "attend"
concurrency groups), so attention never queues behind a rebuild; each group runs its calls
in submission order and each carries the rows it needs, so no call reads a row that is
still on its way. A layer's first attention call waits on the driver for its first build.

Faults: every result is awaited for at most ``timeout_s``. A worker that died, or did not
answer in time (it is then killed), fails the request with a :class:`WorkerError` naming the
worker and its layers; the facade then releases the request's pages. The next request that
builds tables on that shard gets a new actor: KV is not recovered mid-request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hetero.backend import CPUBackend, LSHSpec, WorkerError
from orchestrator.lsh_worker import LSHWorker, Rows
from orchestrator.ray_address import check_address, first_line, probe_gcs, split_address

logger = logging.getLogger(__name__)

# Options of each worker actor (``ray.remote``): one CPU, numba on one thread (as the local
# pool's threads), builds and attention calls in separate threads of the actor. Ray's
# default worker niceness (15) stays: on 2 shared cores with spinning torch threads in the
# driver, actors at niceness 0 made decode steps 2.5-4x slower (785 ms against 200-300).
ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 1,
    "concurrency_groups": {"build": 1, "attend": 1},
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

    def __str__(self) -> str:
        return f"CPU worker {self.index} (a Ray actor serving layers {', '.join(map(str, self.layers))})"


@dataclass(slots=True)
class _Sent:
    """What the driver sent an actor of one layer of one sequence."""

    keys: Tensor  # the driver's host tier of the layer, [Hkv, capacity, D] (views; float32 or half)
    values: Tensor
    built: int  # rows [.., built) went with builds
    attended: int  # rows [first build's hi, attended) went with attention calls
    first: Any  # ObjectRef of the first build, until an attention call waited for it
    latest: Any  # ObjectRef of the latest build, until its error (if any) was raised


class RayFuture:
    """A pending actor call; ``result`` waits at most the backend's ``timeout_s`` and
    returns the call's result through ``post``."""

    def __init__(self, backend: RayBackend, ref: Any, worker: _Worker, what: str,
                 post: Callable[[Any], Any] = lambda x: x):
        self._backend, self._ref, self._worker, self._what, self._post = backend, ref, worker, what, post

    def result(self, timeout: float | None = None) -> Any:
        return self._post(self._backend._get(self._ref, self._worker, self._what, timeout))

    def done(self) -> bool:
        return _done(self._ref)


class RayBackend(CPUBackend):
    """LSH workers as Ray actors.

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
        self._spec: LSHSpec | None = None
        self._workers: list[_Worker] = []
        self._owner: dict[int, _Worker] = {}
        self._sent: dict[tuple[int, int], _Sent] = {}

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        """The registry's early check: the address's syntax, before the model loads."""
        super().check(options)
        check_address(options.get("address"))

    @property
    def workers(self) -> list[_Worker]:
        return list(self._workers)

    def start_lsh(self, spec: LSHSpec) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self._kill_workers()
        self._spec, layers = spec, spec.layers
        cpus = self.actor_options.get("num_cpus", 1) or 1
        n = self.n_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        n = min(n, len(layers)) or 1
        self._workers = [_Worker(i, layers[i::n], None) for i in range(n)]
        for w in self._workers:
            w.actor = self._new_actor(w.layers)
        self._owner = {layer: w for w in self._workers for layer in w.layers}
        try:
            ray.get([w.actor.__ray_ready__.remote() for w in self._workers], timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError) as e:
            self._kill_workers()
            raise WorkerError(
                f"{n} CPU workers ({self.actor_options.get('num_cpus', 1)} CPU each) did not start "
                f"within {self.timeout_s:g} s: the cluster has {ray.available_resources().get('CPU', 0):g} "
                f"free CPUs; pass fewer n_workers or add nodes ({type(e).__name__})") from e

    def submit_build(self, seq_id: int, layer: int, keys: Tensor, values: Tensor, lo: int, hi: int) -> RayFuture:
        w = self._worker(layer)
        if w.dead:  # a new request on a shard whose actor died: a fresh actor, empty
            self._respawn(w)
        sent = self._sent.get((seq_id, layer))
        start = lo if sent is None else min(max(sent.built, lo), hi)
        ref = w.actor.build.options(concurrency_group="build").remote(
            seq_id, layer, None, None, lo, hi, _rows(keys, values, start, hi))
        if sent is None:
            self._sent[(seq_id, layer)] = _Sent(keys, values, hi, hi, ref, ref)
        else:
            sent.built, sent.latest = max(sent.built, hi), ref
        return RayFuture(self, ref, w, f"the build of layer {layer} (sequence {seq_id})")

    def submit_attend(self, layer: int, seq_ids: list[int], q: Tensor, q_codes: Tensor,
                      his: list[int]) -> RayFuture:
        w = self._worker(layer)
        sents = [self._sent.get((seq_id, layer)) for seq_id in seq_ids]
        for seq_id, sent in zip(seq_ids, sents):
            if sent is None:
                raise ValueError(f"no LSH tables for sequence {seq_id}, layer {layer}: submit_build first")
            build = f"the build of layer {layer} (sequence {seq_id})"
            if sent.first is not None:  # the tables must exist before the first attention call
                first, sent.first = sent.first, None
                self._get(first, w, build)
            if sent.latest is not None and _done(sent.latest):
                latest, sent.latest = sent.latest, None
                self._get(latest, w, build)  # its error, once
        rows = []  # taken only once nothing can fail before the call that carries them
        for sent, hi in zip(sents, his):
            rows.append(None)
            if hi > sent.attended:
                rows[-1], sent.attended = _rows(sent.keys, sent.values, sent.attended, hi), hi
        ref = w.actor.attend_batch.options(concurrency_group="attend").remote(
            layer, list(seq_ids), q.numpy(), q_codes.numpy(), list(his), rows)
        seqs = f"sequence{'s' * (len(seq_ids) > 1)} {', '.join(map(str, seq_ids))}"
        return RayFuture(self, ref, w, f"attention of layer {layer} ({seqs})", _tensors)

    def release(self, seq_id: int) -> None:
        """Drop ``seq_id`` on every live worker (after its pending builds); a worker that
        fails here is logged, not raised: release runs when a request ends, failed or not."""
        for key in [key for key in self._sent if key[0] == seq_id]:
            del self._sent[key]
        calls = [(w, w.actor.release.options(concurrency_group="build").remote(seq_id))
                 for w in self._workers if not w.dead]
        for w, ref in calls:
            try:
                self._get(ref, w, f"the release of sequence {seq_id}")
            except WorkerError as e:
                logger.warning("%s", e)

    def table_bytes(self, seq_id: int | None = None) -> dict[int, int]:
        """Per layer; a dead worker's layers hold nothing (0)."""
        out = dict.fromkeys(self._owner, 0)
        for counts in self._ask_live("table_bytes", seq_id):
            out.update(counts)
        return out

    def key_counts(self) -> tuple[int, int]:
        """Summed over the live workers (a dead worker's counts are lost with it)."""
        counts = self._ask_live("key_counts")
        return sum(r for r, _ in counts), sum(o for _, o in counts)

    def describe(self) -> str:
        import ray

        nodes = sum(n["Alive"] for n in ray.nodes())
        cpus = ray.cluster_resources().get("CPU", 0)
        return (f"ray ({nodes} node(s), {cpus:g} CPUs, GCS {ray.get_runtime_context().gcs_address}; "
                f"{len(self._workers)} worker actors)")

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

        spec = self._spec
        shard = {layer: spec.projections[layer] for layer in layers}
        return ray.remote(**self.actor_options)(LSHWorker).remote(shard, spec.k, spec.l, spec.scale)

    def _respawn(self, w: _Worker) -> None:
        import ray

        logger.warning("%s died earlier: starting a new actor for its layers", w)
        ray.kill(w.actor)
        for key in [key for key in self._sent if self._owner[key[1]] is w]:
            del self._sent[key]  # its copy of the KV went with it
        w.actor, w.dead = self._new_actor(w.layers), False

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
            raise ValueError(f"no worker serves layer {layer}: start_lsh first (served: {sorted(self._owner)})")
        return self._owner[layer]

    def _get(self, ref: Any, w: _Worker, what: str, timeout: float | None = None) -> Any:
        """``ray.get`` bounded by ``timeout`` (default ``timeout_s``); a dead or silent worker
        becomes a :class:`WorkerError` (a silent one is killed)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = self.timeout_s if timeout is None else timeout
        try:
            return ray.get(ref, timeout=timeout)
        except RayActorError as e:
            w.dead = True
            raise WorkerError(f"{w} died during {what}: the request fails "
                              f"({type(e).__name__}: {first_line(e)})") from e
        except GetTimeoutError as e:
            w.dead = True
            ray.kill(w.actor)
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


def _rows(keys: Tensor, values: Tensor, start: int, stop: int) -> Rows:
    """Rows ``[start, stop)`` of a layer's host tier as contiguous arrays to send; bfloat16 and
    float16 rows are converted to float32 here (the actor's copy is float32; numpy has no
    bfloat16), other dtypes go as they are (the actor rejects them)."""
    return Rows(start, _send(keys[:, start:stop]), _send(values[:, start:stop]), keys.shape[1])


def _send(rows: Tensor) -> np.ndarray:
    if rows.dtype in (torch.bfloat16, torch.float16):
        rows = rows.float()
    return np.ascontiguousarray(rows.numpy())


def _tensors(arrays: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    """Tensors of arrays returned by an actor (read-only views of the object store: copied)."""
    return tuple(torch.from_numpy(np.array(a)) for a in arrays)


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
