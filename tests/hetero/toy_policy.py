"""A policy the package does not know, in one file: what a new policy needs and nothing
more (``tests/hetero/test_layers.py`` registers it and runs it through ``LLM`` and the CLI).

Decode attention over the resident set (sinks and window), from the default plan; it keeps
per-sequence state through the hooks (pages that left for the host tier) and reports it in
its statistics; it has options of every type the CLI reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from gpu_kernels import paged_decode_attention
from hetero.policies import Policy, StepPlan


@dataclass(slots=True)
class ToyPolicy(Policy):
    name = "toy"
    x: int = 0
    ratio: float = 0.5
    on: bool = False
    label: str = ""
    made: ClassVar[list] = []  # every instance, to see what the options became
    _offloaded: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        Policy.__post_init__(self)
        if self.x < 0:
            raise ValueError(f"toy: x must be >= 0, got {self.x}")
        ToyPolicy.made.append(self)

    def on_admit(self, store, seq_id: int) -> None:
        self._offloaded[seq_id] = 0

    def on_offload(self, store, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        self._offloaded[seq_id] += len(page_idx)

    def on_release(self, seq_id: int) -> None:
        del self._offloaded[seq_id]

    def stats(self, seq_id: int | None = None) -> dict:
        return {"offloaded_pages": self._offloaded[seq_id] if seq_id is not None else sum(self._offloaded.values())}

    def run(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        store, tables = plan.step.store, plan.layers[layer]
        out, _ = paged_decode_attention(q, store.k, store.v, tables.block_table, tables.kv_lens,
                                        plan.step.scale, store.page_size, tables.host)
        return out
