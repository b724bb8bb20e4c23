"""Attention-output fidelity of a policy against exact attention, measured in place.

``AttentionProbe`` wraps the policy of a running ``LLM``: at every decode step and layer it
runs the policy and exact attention over the whole KV (wherever it lives), records the
relative error ``||o - o_exact|| / ||o_exact||`` per sequence, and continues with the exact
output, so errors do not compound and every policy sees the same hidden states.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from hetero import LLM, SamplingParams
from hetero.policies import DecodeStep, Policy, exact_attention


class AttentionProbe:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.errors: dict[int, list[float]] = defaultdict(list)  # layer -> errors

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
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
        errs = [e for layer, es in self.errors.items() if layer >= skip_layers for e in es]
        return sum(errs) / len(errs)


def attention_error(llm: LLM, ids: list[int], n_decode: int = 8, skip_layers: int = 0) -> float:
    """Mean relative attention-output error of ``llm``'s policy over ``n_decode`` steps
    after prefilling ``ids`` (layers below ``skip_layers`` left out)."""
    probe = AttentionProbe(llm.policy)
    llm.engine.policy = probe
    try:
        llm.generate(ids, SamplingParams(max_new_tokens=n_decode + 1, ignore_eos=True))
    finally:
        llm.engine.policy = probe.policy
    return probe.mean_error(skip_layers)
