"""Where to cut a prompt for the chain prefill (KV-Runahead's context-level load balancing).

Worker ``i`` of the chain computes the part ``[s_i, s_{i+1})`` of the prompt. Per layer, a
part of ``n`` tokens after ``c`` earlier ones costs about

    t(n, c) = a·n + b·n·(c + n/2)

seconds: the linear layers (``a`` per token) and causal attention (``b`` per query-key pair:
the part's queries see the ``c`` earlier keys and, on average, half of their own). Every
layer is alike, so equal per-layer times are equal totals; the chain's time to first token
is then close to one worker's total (the waits are the small hop of each layer's K/V down
the chain). Later parts see more keys, so they are shorter.

:func:`fitted_bounds` solves for the cuts (bisection on the common time, parts placed one
after another in closed form); :func:`even_bounds` is the even split it is compared with.
:func:`fit_cost_model` fits ``a`` and ``b`` to measured times
(``orchestrator.calibrate`` measures them). Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hetero.config import is_integer


@dataclass(frozen=True, slots=True)
class CostModel:
    """Per-layer seconds of a part: ``a·n + b·n·(c + n/2)``.

    Attributes
    ----------
    a : seconds per token (the linear layers, norms, RoPE), > 0.
    b : seconds per query-key pair of attention, >= 0.
    """

    a: float
    b: float

    def __post_init__(self):
        if not (math.isfinite(self.a) and self.a > 0):
            raise ValueError(f"CostModel: a must be a finite number > 0, got {self.a!r}")
        if not (math.isfinite(self.b) and self.b >= 0):
            raise ValueError(f"CostModel: b must be a finite number >= 0, got {self.b!r}")

    def layer_time(self, n: float, c: float) -> float:
        """Predicted seconds of one layer for ``n`` tokens after ``c`` earlier ones."""
        return self.a * n + self.b * n * (c + n / 2)

    def part_tokens(self, c: float, t: float) -> float:
        """The ``n >= 0`` with ``layer_time(n, c) == t``: the positive root of
        ``b/2·n² + (a + b·c)·n - t``, written so that ``b`` near 0 loses no precision."""
        p = self.a + self.b * c
        return 2 * t / (p + math.sqrt(p * p + 2 * self.b * t))


def even_bounds(n_tokens: int, workers: int) -> list[int]:
    """``[0, s_1, ..., n_tokens]``: parts of equal length (the first ones a token longer)."""
    _check(n_tokens, workers)
    return [i * n_tokens // workers for i in range(workers + 1)]


def fitted_bounds(n_tokens: int, workers: int, model: CostModel) -> list[int]:
    """``[0, s_1, ..., n_tokens]`` with every part's predicted time equal (to rounding).

    Bisection on the common per-layer time ``t``: for a given ``t`` the parts are placed one
    after another, each the length that takes ``t`` after the ones before
    (:meth:`CostModel.part_tokens`); where the last one ends grows with ``t``, and ``t`` is
    found where it ends at ``n_tokens``. The cuts are rounded to whole tokens, every part
    keeps at least one; lengths do not grow along the chain (up to that rounding).
    """
    _check(n_tokens, workers)
    if not isinstance(model, CostModel):
        raise TypeError(f"model must be a CostModel, got {type(model).__name__}")
    if workers == 1:
        return [0, n_tokens]

    def cuts(t: float) -> list[float]:
        ends, s = [], 0.0
        for _ in range(workers):
            s += model.part_tokens(s, t)
            ends.append(s)
        return ends

    lo, hi = 0.0, model.layer_time(n_tokens, 0)  # one part alone covers the prompt in hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if cuts(mid)[-1] < n_tokens else (lo, mid)
    bounds = [0]
    for i, end in enumerate(cuts(hi)[:-1]):
        least, most = bounds[-1] + 1, n_tokens - (workers - 1 - i)
        bounds.append(min(max(round(end), least), most))
    return [*bounds, n_tokens]


def predicted_times(bounds: Sequence[int], model: CostModel) -> list[float]:
    """Per-layer seconds ``model`` predicts for each part of ``bounds``."""
    return [model.layer_time(e - s, s) for s, e in zip(bounds[:-1], bounds[1:])]


def fit_cost_model(samples: Sequence[tuple[int, int, float]]) -> CostModel:
    """Least-squares ``a``, ``b`` from ``(n, c, seconds)`` measurements of one layer.

    The residuals are relative (each divided by its time), so a long measurement does not
    drown the short ones; at least two samples with different ``c / n`` are needed. A
    negative ``b`` (noise, attention too cheap to see) is fitted again as 0, a negative
    ``a`` as (nearly) 0.
    """
    rows = [(n, n * (c + n / 2), t) for n, c, t in samples]
    if len(rows) < 2 or any(n <= 0 or t <= 0 for n, _, t in rows):
        raise ValueError(f"fit_cost_model needs two or more samples with n > 0 and a time > 0, got {samples!r}")
    # normal equations of min sum((a*x + b*y - t) / t)^2
    sxx = sum((x / t) ** 2 for x, _, t in rows)
    syy = sum((y / t) ** 2 for _, y, t in rows)
    sxy = sum(x * y / t**2 for x, y, t in rows)
    sx = sum(x / t for x, _, t in rows)
    sy = sum(y / t for _, y, t in rows)
    det = sxx * syy - sxy * sxy
    if det <= 1e-12 * sxx * syy:
        raise ValueError("fit_cost_model: the samples do not separate a from b (vary c / n)")
    a, b = (sx * syy - sy * sxy) / det, (sy * sxx - sx * sxy) / det
    if b < 0:
        a, b = sx / sxx, 0.0
    elif a <= 0:  # attention alone explains the times; a stays positive for part_tokens
        a, b = 1e-12, sy / syy
    return CostModel(a, b)


def _check(n_tokens: int, workers: int) -> None:
    if not is_integer(workers) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not is_integer(n_tokens) or n_tokens < workers:
        raise ValueError(f"a prompt of {n_tokens!r} tokens cannot be split over {workers} workers "
                         "(each needs at least one token)")
