"""StreamingLLM: attention over the attention sinks and the local window only (the
baseline every sparse policy must beat on fidelity). Offloaded pages are never read."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from gpu_kernels import paged_decode_attention
from hetero.policies.base import Policy, StepPlan


@dataclass(slots=True)
class StreamingPolicy(Policy):
    name = "streaming"

    def run(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        store, tables = plan.step.store, plan.layers[layer]
        out, _ = paged_decode_attention(q, store.k, store.v, tables.block_table, tables.kv_lens,
                                        plan.step.scale, store.page_size, tables.host)
        return out
