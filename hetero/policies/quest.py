"""Quest (page top-k): score offloaded pages by the upper bound of q·k from their key
min/max, fetch each KV head's top pages into the layer's head cache, attend over sinks +
top pages + local window. ``token_budget`` counts every attended token; the first
``dense_layers`` layers stay exact (Quest keeps two)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from gpu_kernels import paged_decode_attention, quest_page_scores
from hetero.cache.store import HEAD_CACHE_SPARE
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
        if not isinstance(self.token_budget, int) or isinstance(self.token_budget, bool):
            raise ValueError(f"quest: token_budget must be an integer, got {self.token_budget!r}")
        if self.token_budget < self.n_sink + self.n_local:
            raise ValueError(
                f"quest: token_budget {self.token_budget} is below n_sink + n_local "
                f"({self.n_sink + self.n_local}): raise it or shrink the window"
            )

    def top_pages(self, page_size: int) -> int:
        """Offloaded pages each KV head attends to (at least 3, as in Quest)."""
        return max(3, (self.token_budget - self.n_sink - self.n_local) // page_size)

    def offloads(self, fits: bool, n_tokens: int, page_size: int) -> bool:
        # a sequence whose offloadable pages never outnumber the top pages would have every
        # one of them fetched back at each step: it stays whole on the device (exact) if it fits
        offloadable = self.first_local(n_tokens, page_size) - self.sink_pages(page_size)
        return not fits or offloadable > self.top_pages(page_size)

    def cache_pages(self, cfg: ModelConfig, page_size: int) -> int:
        # the head cache (KVStore.fetch_heads): the top pages, each KV head's picks in the
        # same pages, then copies of the resident pages (sinks, window, the page leaving it)
        resident = self.sink_pages(page_size) + self.n_local // page_size + 2
        return self.top_pages(page_size) + resident + HEAD_CACHE_SPARE

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        store = step.store
        ps = store.page_size
        rows = []
        for b, s in enumerate(step.seq_ids):
            table = store.tables[s]
            resident = self.resident_pages(table, layer)
            run = table.offloaded
            if layer < self.dense_layers or not run:
                rows.append(resident)
                continue
            kmin, kmax = store.key_bounds(s, layer)
            scores = quest_page_scores(q[b], kmin, kmax)[:, run.start : run.stop]
            top = scores.topk(min(self.top_pages(ps), len(run)), dim=1, sorted=False)
            # [Hkv, k] page indices, kept on the device; each KV head's picks land in the same
            # device pages, followed by copies of the resident ones: one page list for all heads
            rows.append(store.fetch_heads(s, layer, top.indices.add_(run.start), resident))
        bt, lens, host = pack_tables(rows, [store.tables[s].n_tokens for s in step.seq_ids], ps,
                                     store.cfg.n_kv_heads, q.device)
        out, _ = paged_decode_attention(q, store.k, store.v, bt, lens, step.scale, ps, host)
        return out
