"""Probes that measure a policy inside a running ``LLM`` without changing the runtime.

``AttentionProbe`` wraps the policy: at every decode step and layer it runs the policy and
exact attention over the whole KV (wherever it lives), records the relative error
``||o - o_exact|| / ||o_exact||`` per sequence, and continues with the exact output, so
errors do not compound and every policy sees the same hidden states.

``ForcedDecoder`` wraps the engine: decode steps are fed a given continuation instead of
the sampled tokens (teacher forcing) and the log-probability of each next continuation
token is recorded, so perplexity is measured through the policy's sparse decode attention
(prefill is exact for every policy, so ``LLM.logprobs`` cannot show a policy's error).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from hetero import LLM, SamplingParams
from hetero.policies import DecodeStep, Policy, exact_attention


class AttentionProbe:
    """A policy that delegates to ``policy`` and records its error against exact attention."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.errors: dict[int, list[float]] = defaultdict(list)  # layer -> errors

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        """Exact attention output [B, Hq, D] for ``q`` [B, Hq, D]; records the policy's error."""
        approx = self.policy.attend_decode(layer, q, step)
        store = step.store
        exact = torch.cat([
            exact_attention(store, layer, s, q[b : b + 1], store.tables[s].n_tokens - 1,
                            step.scale, self.policy.stream_pages)[0]
            for b, s in enumerate(step.seq_ids)
        ])
        err = (approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
        self.errors[layer] += err.tolist()
        return exact

    def mean_error(self, skip_layers: int = 0) -> float:
        """Mean relative error over every recorded step and layer ``>= skip_layers``."""
        errs = [e for layer, es in self.errors.items() if layer >= skip_layers for e in es]
        return sum(errs) / len(errs)

    def step_errors(self, skip_layers: int = 0) -> list[float]:
        """Mean relative error of each recorded step (and sequence) over the layers
        ``>= skip_layers``."""
        per_layer = [es for layer, es in sorted(self.errors.items()) if layer >= skip_layers]
        return [sum(col) / len(col) for col in zip(*per_layer)]


def probe_attention(llm: LLM, ids: list[int], n_decode: int = 8) -> AttentionProbe:
    """Run ``n_decode`` decode steps after prefilling ``ids`` with ``llm``'s policy under an
    ``AttentionProbe``; the probe holds the errors."""
    probe = AttentionProbe(llm.policy)
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
