"""Quest (page top-k): score offloaded pages by the upper bound of q·k from their key
min/max, fetch each KV head's top pages into the page cache, attend over sinks + top
pages + local window. ``token_budget`` counts every attended token; the first
``dense_layers`` layers stay exact (Quest keeps two)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_kernels import paged_decode_attention, quest_page_scores
from hetero.config import ModelConfig
from hetero.policies.base import DecodeStep, Policy, pack_tables


@dataclass(slots=True)
class QuestPolicy(Policy):
    name = "quest"
    n_local: int = 64
    dense_layers: int = 2
    token_budget: int = 1024

    def __post_init__(self):
        Policy.__post_init__(self)
        if self.token_budget < self.n_sink + self.n_local:
            raise ValueError(
                f"quest: token_budget {self.token_budget} is below n_sink + n_local "
                f"({self.n_sink + self.n_local}): raise it or shrink the window"
            )

    def top_pages(self, page_size: int) -> int:
        """Offloaded pages each KV head attends to (at least 3, as in Quest)."""
        return max(3, (self.token_budget - self.n_sink - self.n_local) // page_size)

    def cache_pages(self, cfg: ModelConfig, page_size: int) -> int:
        return cfg.n_kv_heads * self.top_pages(page_size)  # heads may pick disjoint pages

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        store = step.store
        ps, hkv = store.page_size, store.cfg.n_kv_heads
        n_sink = self.sink_pages(ps)
        rows = []
        for b, s in enumerate(step.seq_ids):
            table = store.tables[s]
            resident = self.resident_pages(table, layer)
            # the engine offloads exactly the pages between the sinks and `settled`
            if layer < self.dense_layers or not table.offload or table.settled <= n_sink:
                rows.append(resident)
                continue
            kmin, kmax = store.key_bounds(s, layer)
            scores = quest_page_scores(q[b], kmin, kmax)[:, n_sink : table.settled]
            top = scores.topk(min(self.top_pages(ps), scores.shape[1]), dim=1, sorted=False)
            top = top.indices.cpu().add_(n_sink)  # [Hkv, k] page indices (tables are built on host)
            # the heads' union goes through the page cache once
            wanted, inverse = top.unique(return_inverse=True)
            fetched = store.fetch(s, layer, wanted.tolist(), self.cache_pages(store.cfg, ps))
            picked = torch.tensor(fetched, dtype=torch.int32)[inverse]
            sinks, window = resident[:n_sink].expand(hkv, -1), resident[n_sink:].expand(hkv, -1)
            rows.append(torch.cat([sinks, picked, window], dim=1))
        bt, lens = pack_tables(rows, [store.tables[s].n_tokens for s in step.seq_ids], ps, hkv, q.device)
        out, _ = paged_decode_attention(q, store.k, store.v, bt, lens, step.scale, ps)
        return out
