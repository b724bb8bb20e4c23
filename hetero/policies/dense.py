"""Exact attention over every token of the sequence."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from gpu_kernels import paged_decode_attention
from hetero.policies.base import DecodeStep, Policy


@dataclass(slots=True)
class DensePolicy(Policy):
    name = "dense"

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        store = step.store
        out, _ = paged_decode_attention(
            q, store.k, store.v, step.block_tables[layer], step.kv_lens, step.scale,
            store.page_size,
        )
        return out
