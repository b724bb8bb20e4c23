"""What the core asks of an execution backend: CPU workers, sharded by layer, that run named
tasks.

The core (policies, engine) never imports ``orchestrator/``; it talks to this interface,
which an orchestrator backend implements (``orchestrator.local.LocalBackend``: a thread pool
in this process; ``orchestrator.ray_backend.RayBackend``: Ray actors, on this machine or a
cluster). Backends register themselves as entry points of the group ``hetero.backends``
(``pyproject.toml``: name = factory); the facade (``hetero.llm``) looks one up by name
(:func:`backend_factory`), checks its options before the model loads
(:meth:`CPUBackend.check`), creates it and hands it to the policy with ``Policy.bind``.

The interface knows nothing of what the workers compute. A policy that needs CPU workers
describes them with a :class:`WorkerSpec` (a worker class, the layers to shard over, each
layer's data and the constructor's arguments), starts them (:meth:`CPUBackend.start`) and
submits named tasks to the worker that owns a layer (:meth:`CPUBackend.submit`): the backend
calls ``worker.<task>(*args)`` there. MagicPIG's protocol (its tasks and their meaning) is
``hetero.policies.lsh_protocol``; its worker is ``orchestrator.lsh_worker.LSHWorker``.

Calls are asynchronous: ``submit`` returns a future at once, so the device computes its share
of a layer's attention while a CPU worker computes another share. A future's ``result``
raises :class:`WorkerError` when the worker behind it failed, or the task's own error.

One more task, optional, is not a worker's: :meth:`CPUBackend.chain_prefill` prefills one
prompt with several workers in a chain (KV-Runahead), each owning a part of the prompt and
passing every layer's K/V on to the next; it returns a :class:`ChainResult` (the whole KV and
the last token's logits). The local backend runs it as processes (``orchestrator.chain``),
the Ray backend as actors across nodes.

Host-tier data travels as :class:`HostTier` arguments: a worker in this process receives the
object and reads the host tier in place; a worker in another process receives
:class:`HostRows`, the rows of it the backend has not sent that worker before (each row goes
once per worker).
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

if TYPE_CHECKING:  # annotations only: the registry is read by the CLI before torch loads
    import numpy as np
    from torch import Tensor

BACKEND_GROUP = "hetero.backends"


class Future(Protocol):
    """The part of ``concurrent.futures.Future`` the core uses."""

    def result(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...


class Ready(Protocol):
    """Something to wait for before a task reads its arguments (``Device.copy_event()``: the
    device→host copies into them have landed)."""

    def wait(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """The workers a backend starts: instances of one class, each serving a shard of
    ``layers`` and constructed as ``worker({layer: per_layer[layer] for its layers}, *args,
    **kwargs)``.

    Attributes
    ----------
    worker : the worker class, or its importable path ``"module:Class"`` (imported where the
        workers start: a Ray backend's actors import it by name, so the core need not import
        the module that defines it).
    per_layer : layer -> that layer's data; the layers listed are the ones served.
    args, kwargs : the rest of the constructor's arguments, the same for every shard
        (picklable, for workers in other processes).

    A worker class's public methods are its tasks; it must have ``release(seq_id)``, which
    drops what it keeps of a sequence.
    """

    worker: str | type
    per_layer: Mapping[int, Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.per_layer)

    def worker_class(self) -> type:
        """The worker class (imported if given by path)."""
        if isinstance(self.worker, type):
            return self.worker
        module, sep, name = str(self.worker).partition(":")
        if not sep or not module or not name:
            raise ValueError(f"a worker class is named 'module:Class', got {self.worker!r}")
        return getattr(importlib.import_module(module), name)

    def shard_args(self, layers: list[int]) -> tuple[tuple, dict[str, Any]]:
        """The constructor's arguments for the worker serving ``layers``."""
        return ({layer: self.per_layer[layer] for layer in layers}, *self.args), dict(self.kwargs)

    def shards(self, n: int) -> list[list[int]]:
        """``layers`` dealt out to at most ``n`` workers (``i``-th served layer -> worker
        ``i % n``), so neighbouring layers run on different workers."""
        layers = self.layers
        n = max(1, min(n, len(layers)))
        return [layers[i::n] for i in range(n)]


@dataclass(frozen=True, slots=True)
class HostTier:
    """Positions ``[start, stop)`` of one layer's host tier of one sequence, as a task
    argument (alone or in a list).

    ``keys``, ``values`` are ``[Hkv, capacity, D]`` CPU tensors indexed by token position
    (views of the store's host tier: float32, bfloat16 or float16). A worker in this process
    receives this object and reads the tensors in place (rows written later are there when
    a later task reads them); a worker in another process receives :class:`HostRows`
    instead. Positions before ``start`` are not read by the task.
    """

    seq_id: int
    layer: int
    keys: Tensor
    values: Tensor
    start: int
    stop: int

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]


class HostRows(NamedTuple):
    """What a worker in another process receives for a :class:`HostTier` argument: the same
    positions ``[start, stop)``, of which it is sent rows ``[first, stop)`` (the rest it
    received with earlier tasks), for it to keep in its own copy of the host tier.

    Attributes
    ----------
    keys, values : [Hkv, stop - first, D] float32 (a backend converts half-precision rows:
        numpy has no bfloat16), possibly empty.
    capacity : positions of the sequence's host tier (to allocate the copy at).
    """

    seq_id: int
    layer: int
    start: int
    stop: int
    first: int
    keys: np.ndarray
    values: np.ndarray
    capacity: int


class WorkerError(RuntimeError):
    """A CPU worker failed (it died, or did not answer in time): the request that needed it
    fails; the message names the worker and the layers it served."""


ChainProgress = Callable[[int, int, int], None]
"""``progress(worker, layers_done, n_layers)``: a chain-prefill worker finished a layer."""


@dataclass(slots=True)
class ChainResult:
    """What a chain prefill (KV-Runahead: :meth:`CPUBackend.chain_prefill`) returns: the whole
    prompt's KV, the last token's logits and how the workers spent their time.

    Attributes
    ----------
    token_ids : the prompt.
    k, v : per layer ``[n, Hkv, D]`` keys (after RoPE at their absolute positions) and values,
        in the model's dtype, on the CPU: what ``hetero.kvcache.KVCache`` holds.
    logits : ``[vocab]`` float32 logits of the prompt's last token (the first token is their
        argmax under greedy sampling: :attr:`first_token`).
    bounds : ``[0, s_1, ..., n]``: worker ``i`` computed the tokens ``[bounds[i], bounds[i+1])``.
    partition : how the bounds were chosen, ``"fitted"`` (cost model) or ``"even"``.
    busy_s : per worker, seconds computing (the job's wall time less its waits).
    wait_s : per worker, seconds waiting: for the previous worker's K/V (``recv``) and for
        its own sends to complete.
    ttft_s : seconds from handing the prompt to the workers (loaded, connected) to the
        launcher holding the last token's logits.
    startup_s : seconds to start the workers (spawn, model load, connect); 0 if they were
        running already.
    kv_s : seconds from the logits to the launcher holding the whole KV.
    """

    token_ids: list[int]
    k: list[Tensor]
    v: list[Tensor]
    logits: Tensor
    bounds: list[int]
    partition: str
    busy_s: list[float]
    wait_s: list[float]
    ttft_s: float
    startup_s: float = 0.0
    kv_s: float = 0.0

    @property
    def workers(self) -> int:
        return len(self.bounds) - 1

    @property
    def first_token(self) -> int:
        """The greedy first token (argmax of :attr:`logits`)."""
        return int(self.logits.argmax())

    @property
    def imbalance(self) -> float:
        """Largest over smallest busy time of the workers (1.0 is perfect balance)."""
        return max(self.busy_s) / max(min(self.busy_s), 1e-9)

    def kv_cache(self, model: str, config_hash: str, page_size: int, chat: bool = False):
        """The result as a ``hetero.kvcache.KVCache`` (``model``: the LLM's ``model_name``,
        ``config_hash``: ``hetero.kvcache.config_hash`` of its config); the tensors are
        shared, not copied."""
        from hetero.kvcache import KVCache

        return KVCache(model, config_hash, self.k[0].dtype, page_size, list(self.token_ids),
                       self.k, self.v, chat)


class CPUBackend(ABC):
    """Runs CPU workers sharded by layer and the tasks submitted to them."""

    name: ClassVar[str]
    # True if the workers run in this process: a task's arguments are passed by reference
    # and a call costs no round trip (a client may then split a call, e.g. per sequence, to
    # spread it over the pool); False if each call is a message to another process.
    in_process: ClassVar[bool] = False

    @abstractmethod
    def start(self, spec: WorkerSpec) -> None:
        """Create the workers of ``spec`` (drops any earlier ones)."""

    @abstractmethod
    def submit(self, layer: int, task: str, *args: Any, background: bool = False,
               ready: Ready | None = None) -> Future:
        """Run ``worker.<task>(*args)`` on the worker that owns ``layer``; the future's result
        is the task's.

        Tasks of one kind (``background`` or not) run in submission order per worker;
        ``background`` tasks (builds, rebuilds) run apart from the others, so a task never
        queues behind a background one. ``ready`` is waited for before the arguments are
        read: on a pool thread by an in-process backend, just before the arguments are sent
        by one whose workers are elsewhere. Raises ``ValueError`` at once if no worker
        serves ``layer``.
        """

    @abstractmethod
    def call_all(self, task: str, *args: Any) -> list[Any]:
        """``worker.<task>(*args)`` on every live worker, waited for: their answers (a
        worker that fails is logged and left out; these are bookkeeping calls, made while a
        failed request is cleaned up too)."""

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """``worker.release(seq_id)`` on every worker, after the background tasks submitted
        before; drop what the backend keeps of the sequence (rows sent). A worker that fails
        here is logged, not raised: release runs when a request ends, failed or not."""

    def describe(self) -> str:
        """One line for ``hetero info``: the backend and where its workers run."""
        return self.name

    def chain_prefill(self, source: str | None, dtype: Any, token_ids: list[int], workers: int,
                      partition: str = "fitted", progress: ChainProgress | None = None) -> ChainResult:
        """Prefill ``token_ids`` with ``workers`` processes in a chain (KV-Runahead).

        Worker ``i`` loads the model (``source`` as ``hetero.loader.load_checkpoint`` takes
        it, dense weights in ``dtype``), owns one contiguous part of the prompt and computes
        it layer by layer: at each layer it receives the K/V of all earlier parts from worker
        ``i - 1``, appends its own, passes the grown K/V on to worker ``i + 1`` and attends
        (causal within its part). The last worker holds every layer's whole KV and the last
        token's logits. ``partition``: ``"fitted"`` (parts of equal predicted time from a
        cost model fitted on this machine: later parts shorter) or ``"even"``.
        ``progress(worker, layers_done, n_layers)`` is called in this process as workers
        finish layers.

        Raises ``ValueError`` for bad arguments, :class:`WorkerError` naming the worker (and
        its tokens) when one dies or fails; the other workers are stopped. Optional: the
        default raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"backend {self.name!r} has no chain prefill")

    def close(self) -> None:
        """Stop the workers; the backend may not be used afterwards."""

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        """Check ``options`` (the constructor's keyword arguments) before the model loads,
        cheaply: no worker starts, nothing is imported beyond the backend's module. Raises
        ``ValueError`` or ``TypeError``. The default checks that each option is a parameter
        of the constructor."""
        params = inspect.signature(cls).parameters
        unknown = sorted(set(options) - set(params))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"backend {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                            f"its options: {', '.join(params) or 'none'}")


# -- the registry -------------------------------------------------------------------------


def backend_names() -> list[str]:
    """Names of the registered backends (entry points of the group ``hetero.backends``),
    sorted; reading them imports no backend."""
    return sorted({ep.name for ep in entry_points(group=BACKEND_GROUP)})


def backend_factory(name: str) -> Callable[..., CPUBackend]:
    """The factory (usually a :class:`CPUBackend` subclass) registered as ``name``: called
    with the backend's options it returns the backend. Imports the backend's module."""
    found = {ep.name: ep for ep in entry_points(group=BACKEND_GROUP)}
    if name not in found:
        if not found:
            raise ValueError(f"unknown backend {name!r}: no backend is registered (entry points "
                             f"{BACKEND_GROUP!r}); install the package: pip install -e .")
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(found))}")
    return found[name].load()


def check_backend(name: str, options: dict[str, Any]) -> Callable[..., CPUBackend]:
    """Look ``name`` up and run its early check of ``options`` (its ``check`` attribute, if
    it has one); returns the factory."""
    factory = backend_factory(name)
    check = getattr(factory, "check", None)
    if check is not None:
        check(options)
    return factory
