"""What the core asks of an execution backend: CPU attention over the offloaded KV.

The core (policies, engine) never imports ``orchestrator/``; it talks to this interface,
which an orchestrator backend implements (``orchestrator.local.LocalBackend``: a thread pool
in this process; ``orchestrator.ray_backend.RayBackend``: Ray actors, on this machine or a
cluster). Backends register themselves as entry points of the group ``hetero.backends``
(``pyproject.toml``: name = factory); the facade (``hetero.llm``) looks one up by name
(:func:`backend_factory`), checks its options before the model loads
(:meth:`CPUBackend.check`), creates it and hands it to the policy with ``Policy.bind``.

Calls are asynchronous: ``submit_*`` return a future at once, so the device computes its
share of a layer's attention (the resident set) while a CPU worker computes the offloaded
share; the two ``(out, lse)`` partials merge exactly. A future's ``result`` raises
:class:`WorkerError` when the worker behind it failed.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # annotations only: the registry is read by the CLI before torch loads
    import numpy as np
    from torch import Tensor

BACKEND_GROUP = "hetero.backends"


class Future(Protocol):
    """The part of ``concurrent.futures.Future`` the core uses."""

    def result(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...


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


class WorkerError(RuntimeError):
    """A CPU worker failed (it died, or did not answer in time): the request that needed it
    fails; the message names the worker and the layers it served."""


class CPUBackend(ABC):
    """Runs CPU workers that hold LSH tables over the host tier and attend over it."""

    name: ClassVar[str]

    @abstractmethod
    def start_lsh(self, spec: LSHSpec) -> None:
        """Create the workers that serve ``spec.layers`` (drops any earlier ones)."""

    @abstractmethod
    def submit_build(
        self, seq_id: int, layer: int, keys: Tensor, values: Tensor, lo: int, hi: int
    ) -> Future:
        """Build (or rebuild) the tables of one layer of ``seq_id`` over key positions
        ``[lo, hi)``.

        ``keys``, ``values`` are the layer's host tier, ``[Hkv, capacity, D]`` CPU tensors
        (float32, bfloat16 or float16) indexed by token position, whose copies from the
        device have landed; the backend keeps them and reads later positions from them as
        they are offloaded (workers in the process read float32 in place and convert half
        rows into a float32 copy, workers elsewhere receive float32 copies of the rows they
        need). The future's result is None.
        """

    @abstractmethod
    def submit_attend(self, layer: int, seq_ids: list[int], q: Tensor, q_codes: Tensor,
                      his: list[int]) -> Future:
        """Attention of one layer for a batch: ``q[i]`` [Hq, D] (float32, CPU) with codes
        ``q_codes[i]`` [Hq, L] over the offloaded positions ``[lo, his[i])`` of sequence
        ``seq_ids[i]``, sampled where its tables reach, exact beyond. One call per layer and
        step for the whole batch. The future's result is ``(out [n, Hq, D] float32, lse
        [n, Hq] float32)``, CPU tensors (``lse = -inf`` and ``out = 0`` where nothing is
        offloaded).

        Waits for a sequence's first build of the layer if it is still running.
        """

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """Drop every table of ``seq_id`` (after its pending builds finish)."""

    @abstractmethod
    def table_bytes(self, seq_id: int | None = None) -> dict[int, int]:
        """Bytes of LSH state (tables, key norms, centres) per layer, of one sequence or
        of all."""

    @abstractmethod
    def key_counts(self) -> tuple[int, int]:
        """Keys read by the workers' attention calls (sampled candidates and exact tail),
        and offloaded keys they could have read; both summed over query heads and calls
        since the backend started."""

    def describe(self) -> str:
        """One line for ``hetero info``: the backend and where its workers run."""
        return self.name

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
