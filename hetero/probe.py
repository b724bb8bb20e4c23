"""Probes that measure a policy inside a running ``LLM`` through the engine's public hooks
(``Engine.attention_hooks``, ``Engine.step_hooks``), without changing the runtime.

``AttentionProbe`` runs after the policy at every decode step and layer: it computes exact
attention over the whole KV (wherever it lives), records the relative error
``||o - o_exact|| / ||o_exact||`` per sequence, and returns the exact output for the model to
go on with, so errors do not compound and every policy sees the same hidden states. Exact
means the model's own attention, causal at true positions: under a policy with bounded
positions (``actqkv``), whose keys are stored and whose query arrives before the rotary
embedding, the reference rotates them itself (:func:`true_position_attention`).
``TopKOracle`` does the same for oracle token top-k attention (the best any choice of k keys
per head can do by score, the baseline of the MagicPIG paper), on a run that keeps the whole
KV. ``time_decode_steps`` records the wall time of each decode step.

Every probe is attached for a ``with`` block (``probe.attach(llm)``, ``time_decode_steps(llm)``,
or :func:`hooked` for any hook) and removed on every exit. Teacher forcing through the
policy's decode attention is ``LLM.decode_logprobs``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hetero.cache import OFFLOADED, KVStore
from hetero.model import Rope, apply_rope
from hetero.policies import StepPlan, exact_attention
from hetero.sampling import SamplingParams

if TYPE_CHECKING:
    from hetero.llm import LLM


@contextmanager
def hooked(hooks: list, hook: Callable) -> Iterator[Callable]:
    """``hook`` in ``hooks`` (an engine's ``attention_hooks`` or ``step_hooks``) for the
    ``with`` block; removed on every exit, an error included."""
    hooks.append(hook)
    try:
        yield hook
    finally:
        hooks.remove(hook)


@contextmanager
def time_decode_steps(llm: LLM) -> Iterator[list[float]]:
    """Seconds of each decode step of ``llm`` inside the ``with`` block: the yielded list
    grows as the LLM decodes (clear it between runs)."""
    steps: list[float] = []
    with hooked(llm.engine.step_hooks, steps.append):
        yield steps


def _relative_error(approx: Tensor, exact: Tensor) -> list[float]:
    """``||approx - exact|| / ||exact||`` per row of [B, ...] outputs."""
    return ((approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).tolist()


def _step_means(errors: dict[int, list[float]], skip_layers: int) -> list[float]:
    """Mean over the layers ``>= skip_layers`` of each recorded step (and sequence)."""
    per_layer = [es for layer, es in sorted(errors.items()) if layer >= skip_layers]
    return [sum(col) / len(col) for col in zip(*per_layer)]


class _ExactHook(ABC):
    """An attention hook (``hook(layer, q, plan, out)``) that measures ``out`` and returns
    exact attention in its place."""

    stream_pages = 64  # offloaded pages fetched at a time: the policy's, once attached
    rope: Rope | None = None  # the reference's rotary embedding, once attached to bounded positions

    @contextmanager
    def attach(self, llm: LLM) -> Iterator:
        """This probe in ``llm``'s attention hooks for the ``with`` block."""
        engine = llm.engine
        self.stream_pages = engine.policy.stream_pages
        self.rope = Rope(engine.store.cfg) if engine.policy.bounded_positions else None
        with hooked(engine.attention_hooks, self):
            yield self

    def exact(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        """Exact attention [B, Hq, D] of ``q`` [B, Hq, D] over each sequence's whole KV (keys
        and query before the rotary embedding under bounded positions)."""
        step = plan.step
        return torch.cat([
            exact_attention(step.store, layer, s, q[b : b + 1], n - 1, step.scale, self.stream_pages)[0]
            if self.rope is None else true_position_attention(step.store, layer, s, q[b], n, step.scale, self.rope)
            for b, (s, n) in enumerate(zip(step.seq_ids, step.n_tokens))
        ])

    @abstractmethod
    def __call__(self, layer: int, q: Tensor, plan: StepPlan, out: Tensor) -> Tensor:
        """Measure ``out`` of one layer; return the exact output to go on with."""


def true_position_attention(store: KVStore, layer: int, seq_id: int, q: Tensor, n: int, scale: float,
                            rope: Rope) -> Tensor:
    """Attention [1, Hq, D] of the query ``q`` [Hq, D] of token ``n - 1`` over keys ``0..n-1`` of
    one layer of ``seq_id``, both before the rotary embedding (a policy with bounded
    positions stores its keys so): the query rotated at ``n - 1`` and every key at its own
    position, as the model attends without bounded positions.

    Computed in float32 on the host, from the device pool's resident pages and the host
    tier's offloaded ones (``KVStore.host_tier`` waits for the copies into it): it takes no
    device pages, whatever the budget."""
    ps, hkv = store.page_size, store.cfg.n_kv_heads
    pages = torch.tensor(store.tables[seq_id].layers[layer][: -(-n // ps)]).repeat_interleave(ps)[:n]
    slots = pages * ps + torch.arange(n) % ps  # each token's pool slot, where resident
    away = pages == OFFLOADED
    kv = torch.empty((2, hkv, n, q.shape[-1]))
    kv[:, :, ~away] = store.kv[:, :, slots[~away].to(store.kv.device)].float().cpu()
    if away.any():
        kv[:, :, away] = store.host_tier(seq_id)[layer][:, :, :n][:, :, away].float()
    cos, sin = rope.span(n, torch.float32, torch.device("cpu"))
    k = apply_rope(kv[0].transpose(0, 1), cos, sin).transpose(0, 1)  # [Hkv, n, D]
    qr = apply_rope(q.float().cpu(), cos[n - 1], sin[n - 1]).view(hkv, -1, q.shape[-1])
    p = torch.softmax(qr @ k.transpose(1, 2) * scale, dim=-1)  # [Hkv, G, n]
    return (p @ kv[1]).view(1, *q.shape).to(q.device, q.dtype)


class AttentionProbe(_ExactHook):
    """Records the policy's error against exact attention per layer, and how many tokens
    of each layer were on the device (not offloaded) when it attended."""

    def __init__(self):
        self.errors: dict[int, list[float]] = defaultdict(list)  # layer -> errors
        self.resident: dict[int, list[int]] = defaultdict(list)  # layer -> device tokens

    def __call__(self, layer: int, q: Tensor, plan: StepPlan, out: Tensor) -> Tensor:
        store = plan.step.store
        for table in plan.step.tables:
            n_off = table.layers[layer][: table.settled].count(OFFLOADED) * store.page_size
            self.resident[layer].append(table.n_tokens - n_off)
        exact = self.exact(layer, q, plan)
        self.errors[layer] += _relative_error(out, exact)
        return exact

    def mean_error(self, skip_layers: int = 0) -> float:
        """Mean relative error over every recorded step and layer ``>= skip_layers``."""
        errs = [e for layer, es in self.errors.items() if layer >= skip_layers for e in es]
        return sum(errs) / len(errs)

    def step_errors(self, skip_layers: int = 0) -> list[float]:
        """Mean relative error of each recorded step (and sequence) over the layers
        ``>= skip_layers``."""
        return _step_means(self.errors, skip_layers)

    def mean_resident(self, skip_layers: int = 0) -> float:
        """Mean tokens on the device per recorded step and layer ``>= skip_layers``."""
        res = [r for layer, rs in self.resident.items() if layer >= skip_layers for r in rs]
        return sum(res) / len(res)


def topk_attention(q: Tensor, k: Tensor, v: Tensor, budget: int, scale: float,
                   v_slots: Tensor | None = None) -> Tensor:
    """Oracle token top-k attention: each query head of ``q`` [Hq, D] attends only to its
    ``budget`` keys of highest true score in ``k``, ``v`` [Hkv, N, D] (GQA). Returns [Hq, D].
    With ``v_slots`` [N], key ``i``'s value is ``v[:, v_slots[i]]`` (the store's pool: only
    the picked values are read)."""
    hq, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    scores = (q.view(hkv, g, d) @ k.transpose(1, 2)) * scale  # [Hkv, G, N]
    top = scores.topk(min(budget, n), dim=-1)
    p = torch.softmax(top.values, dim=-1)
    rows = top.indices if v_slots is None else v_slots[top.indices]
    picked = v[torch.arange(hkv, device=v.device)[:, None, None], rows]  # [Hkv, G, k, D]
    return (p[..., None] * picked).sum(2).reshape(hq, d)


def _resident_slots(store: KVStore, table, layer: int) -> Tensor:
    """Pool slots of one layer's tokens, for a sequence that keeps its whole KV on the device."""
    ps = store.page_size
    pages = table.layers[layer][: -(-table.n_tokens // ps)]
    if OFFLOADED in pages:
        raise ValueError("oracle top-k needs the whole KV on the device: raise the budget")
    slots = (torch.tensor(pages)[:, None] * ps + torch.arange(ps)).flatten()[: table.n_tokens]
    return slots.to(store.k.device)


def _resident_kv(store: KVStore, table, layer: int) -> tuple[Tensor, Tensor]:
    """Keys and values [Hkv, n, D] of one layer of a sequence that keeps its whole KV on
    the device."""
    slots = _resident_slots(store, table, layer)
    return store.k[:, slots], store.v[:, slots]


class TopKAttention:
    """An attention hook that makes a run that keeps its whole KV (the dense policy within
    budget) decode with oracle token top-k attention (``topk_attention``, ``budget`` keys
    per query head) in the layers ``>= skip_layers``: the accuracy bound of any selection
    that touches ``budget`` keys. Not a runtime policy: it reads every key to choose."""

    def __init__(self, budget: int, skip_layers: int):
        self.budget, self.skip_layers = budget, skip_layers

    def __call__(self, layer: int, q: Tensor, plan: StepPlan, out: Tensor) -> Tensor | None:
        if layer < self.skip_layers:
            return None
        rows, store = [], plan.step.store
        for b, table in enumerate(plan.step.tables):
            slots = _resident_slots(store, table, layer)
            rows.append(topk_attention(q[b], store.k[:, slots], store.v, self.budget, plan.step.scale, slots))
        return torch.stack(rows).to(out.dtype)


class TopKOracle(_ExactHook):
    """Records the error oracle token top-k attention (``topk_attention``) would make at
    each of ``budgets`` tokens in the layers ``>= skip_layers``, for sequences that keep
    their whole KV on the device (the dense policy within budget). Not a runtime policy: it
    reads every key to choose its keys."""

    def __init__(self, budgets: list[int], skip_layers: int):
        self.budgets, self.skip_layers = budgets, skip_layers
        self.errors: dict[int, dict[int, list[float]]] = {b: defaultdict(list) for b in budgets}

    def __call__(self, layer: int, q: Tensor, plan: StepPlan, out: Tensor) -> Tensor:
        exact = self.exact(layer, q, plan)
        if layer < self.skip_layers:
            return exact
        for b, table in enumerate(plan.step.tables):
            k, v = _resident_kv(plan.step.store, table, layer)
            for budget in self.budgets:
                approx = topk_attention(q[b], k, v, budget, plan.step.scale)
                self.errors[budget][layer] += _relative_error(approx[None], exact[b : b + 1])
        return exact

    def step_errors(self, budget: int) -> list[float]:
        return _step_means(self.errors[budget], self.skip_layers)


def probe_attention(llm: LLM, ids: list[int], n_decode: int = 8, probe: _ExactHook | None = None):
    """Run ``n_decode`` decode steps after prefilling ``ids`` with ``llm``'s policy, with
    ``probe`` (default a new ``AttentionProbe``) attached; returns the probe, which holds
    the errors."""
    probe = AttentionProbe() if probe is None else probe
    with probe.attach(llm):
        llm.generate(ids, SamplingParams(max_new_tokens=n_decode + 1, ignore_eos=True))
    return probe


def attention_error(llm: LLM, ids: list[int], n_decode: int = 8, skip_layers: int = 0) -> float:
    """Mean relative attention-output error of ``llm``'s policy over ``n_decode`` steps
    after prefilling ``ids`` (layers below ``skip_layers`` left out)."""
    return probe_attention(llm, ids, n_decode).mean_error(skip_layers)
