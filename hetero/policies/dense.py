"""Exact attention over every token. When the whole KV fits the device budget nothing moves;
otherwise pages outside the sinks and local window go to the host and are streamed back
through the page cache each step (``stream_pages`` at a time), merged by LSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_kernels import paged_decode_attention
from hetero.config import ModelConfig
from hetero.policies.base import Policy, StepPlan
from hetero.policies.exact import exact_attention


@dataclass(slots=True)
class DensePolicy(Policy):
    name = "dense"

    def offloads(self, fits: bool, n_tokens: int, page_size: int) -> bool:
        return not fits

    def steady_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int) -> int:
        # a decode step streams one layer's offloaded pages at a time through its page cache
        return Policy.steady_pages(self, cfg, n_tokens, page_size) + self.stream_pages

    def run(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        step, store = plan.step, plan.step.store
        if not any(t.offload for t in step.tables):
            tables = plan.layers[layer]
            out, _ = paged_decode_attention(q, store.k, store.v, tables.block_table, tables.kv_lens,
                                            step.scale, store.page_size, tables.host)
            return out
        rows = []
        for b, s in enumerate(step.seq_ids):
            n = store.tables[s].n_tokens  # the new token included
            rows.append(exact_attention(store, layer, s, q[b : b + 1], n - 1, step.scale,
                                        self.stream_pages)[0])
        return torch.cat(rows)
