"""Probes that measure a policy inside a running ``LLM`` without changing the runtime.

``AttentionProbe`` wraps the policy: at every decode step and layer it runs the policy and
exact attention over the whole KV (wherever it lives), records the relative error
``||o - o_exact|| / ||o_exact||`` per sequence, and continues with the exact output, so
errors do not compound and every policy sees the same hidden states. ``TopKOracle`` does
the same for oracle token top-k attention (the best any choice of k keys per head can do
by score, the baseline of the MagicPIG paper), on a run that keeps the whole KV.

``time_decode_steps`` records the wall time of each decode step.

``ForcedDecoder`` wraps the engine: decode steps are fed a given continuation instead of
the sampled tokens (teacher forcing) and the log-probability of each next continuation
token is recorded, so perplexity is measured through the policy's sparse decode attention
(prefill is exact for every policy, so ``LLM.logprobs`` cannot show a policy's error).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
from torch import Tensor

from hetero import LLM, SamplingParams
from hetero.cache import OFFLOADED


def time_decode_steps(llm: LLM) -> list[float]:
    """Seconds of each ``Engine.decode`` call of ``llm`` from now on: the returned list grows
    as the LLM decodes (clear it between runs)."""
    steps, decode = [], llm.engine.decode

    def timed(*args):
        t = time.perf_counter()
        out = decode(*args)
        steps.append(time.perf_counter() - t)
        return out

    llm.engine.decode = timed
    return steps
from hetero.policies import DecodeStep, Policy, exact_attention


def _relative_error(approx: Tensor, exact: Tensor) -> list[float]:
    """``||approx - exact|| / ||exact||`` per row of [B, ...] outputs."""
    return ((approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).tolist()


def _step_means(errors: dict[int, list[float]], skip_layers: int) -> list[float]:
    """Mean over the layers ``>= skip_layers`` of each recorded step (and sequence)."""
    per_layer = [es for layer, es in sorted(errors.items()) if layer >= skip_layers]
    return [sum(col) / len(col) for col in zip(*per_layer)]


class AttentionProbe:
    """A policy that delegates to ``policy`` and records its error against exact attention,
    and how many tokens of each layer were on the device (not offloaded) when it attended."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.errors: dict[int, list[float]] = defaultdict(list)  # layer -> errors
        self.resident: dict[int, list[int]] = defaultdict(list)  # layer -> device tokens

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        """Exact attention output [B, Hq, D] for ``q`` [B, Hq, D]; records the policy's error."""
        store = step.store
        for s in step.seq_ids:
            table = store.tables[s]
            n_off = table.layers[layer][: table.settled].count(OFFLOADED) * store.page_size
            self.resident[layer].append(table.n_tokens - n_off)
        approx = self.policy.attend_decode(layer, q, step)
        exact = torch.cat([
            exact_attention(store, layer, s, q[b : b + 1], store.tables[s].n_tokens - 1,
                            step.scale, self.policy.stream_pages)[0]
            for b, s in enumerate(step.seq_ids)
        ])
        self.errors[layer] += _relative_error(approx, exact)
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


def topk_attention(q: Tensor, k: Tensor, v: Tensor, budget: int, scale: float) -> Tensor:
    """Oracle token top-k attention: each query head of ``q`` [Hq, D] attends only to its
    ``budget`` keys of highest true score in ``k``, ``v`` [Hkv, N, D] (GQA). Returns [Hq, D]."""
    hq, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    scores = (q.view(hkv, g, d) @ k.transpose(1, 2)) * scale  # [Hkv, G, N]
    top = scores.topk(min(budget, n), dim=-1)
    p = torch.softmax(top.values, dim=-1)
    picked = torch.gather(v[:, None].expand(hkv, g, n, d), 2,
                          top.indices[..., None].expand(-1, -1, -1, d))  # [Hkv, G, k, D]
    return (p[..., None] * picked).sum(2).reshape(hq, d)


class TopKOracle:
    """Exact attention for sequences that keep their whole KV on the device (the dense
    policy within budget), recording the error oracle token top-k attention
    (``topk_attention``) would make at each of ``budgets`` tokens in the layers
    ``>= skip_layers``. Not a runtime policy: it reads every key to choose its keys."""

    def __init__(self, policy: Policy, budgets: list[int], skip_layers: int):
        self.policy, self.budgets, self.skip_layers = policy, budgets, skip_layers
        self.errors: dict[int, dict[int, list[float]]] = {b: defaultdict(list) for b in budgets}

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        exact = self.policy.attend_decode(layer, q, step)
        if layer < self.skip_layers:
            return exact
        store, ps = step.store, step.store.page_size
        for b, s in enumerate(step.seq_ids):
            table = store.tables[s]
            pages = table.layers[layer][: -(-table.n_tokens // ps)]
            if OFFLOADED in pages:
                raise ValueError("TopKOracle needs the whole KV on the device: raise the budget")
            slots = (torch.tensor(pages)[:, None] * ps + torch.arange(ps)).flatten()[: table.n_tokens]
            k, v = store.k[:, slots], store.v[:, slots]
            for budget in self.budgets:
                out = topk_attention(q[b], k, v, budget, step.scale)
                self.errors[budget][layer] += _relative_error(out[None], exact[b : b + 1])
        return exact

    def step_errors(self, budget: int) -> list[float]:
        return _step_means(self.errors[budget], self.skip_layers)


def probe_attention(llm: LLM, ids: list[int], n_decode: int = 8, probe=None):
    """Run ``n_decode`` decode steps after prefilling ``ids`` with ``llm``'s policy under
    ``probe`` (default an ``AttentionProbe`` of it); returns the probe, which holds the
    errors."""
    probe = probe or AttentionProbe(llm.policy)
    llm.engine.policy = probe
    try:
        llm.generate(ids, SamplingParams(max_new_tokens=n_decode + 1, ignore_eos=True))
    finally:
        llm.engine.policy = probe.policy
    return probe


def attention_error(llm: LLM, ids: list[int], n_decode: int = 8, skip_layers: int = 0) -> float:
    """Mean relative attention-output error of ``llm``'s policy over ``n_decode`` steps
    after prefilling ``ids`` (layers below ``skip_layers`` left out)."""
    return probe_attention(llm, ids, n_decode).mean_error(skip_layers)


class ForcedDecoder:
    """An engine whose decode steps read ``continuation`` instead of the sampled tokens.

    Step ``i`` feeds ``continuation[i]`` and records log p(``continuation[i + 1]``), so
    after ``len(continuation) - 1`` steps every token but the first is scored.
    """

    def __init__(self, engine, continuation: list[int]):
        self.engine, self.continuation = engine, continuation
        self.logprobs: list[float] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> Tensor:
        """Logits [1, vocab] of the forced token; one sequence only."""
        if len(seq_ids) != 1:
            raise ValueError("ForcedDecoder scores one sequence at a time")
        i = len(self.logprobs)
        logits = self.engine.decode(seq_ids, [self.continuation[i]])
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        self.logprobs.append(float(logp[self.continuation[i + 1]]))
        return logits


def forced_nll(llm: LLM, context: list[int], continuation: list[int]) -> float:
    """Mean negative log-likelihood (nats) of ``continuation[1:]`` after ``context``, every
    token scored by a decode step through ``llm``'s policy."""
    if len(continuation) < 2:
        raise ValueError("continuation needs at least two tokens")
    forced = ForcedDecoder(llm.engine, continuation)
    llm.engine = forced
    try:
        llm.generate(context, SamplingParams(max_new_tokens=len(continuation), ignore_eos=True))
    finally:
        llm.engine = forced.engine
    return -sum(forced.logprobs) / len(forced.logprobs)


def perplexity(nll: float) -> float:
    return math.exp(nll)
