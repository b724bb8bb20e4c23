"""StreamingLLM: attention over the attention sinks and the local window only (the
baseline every sparse policy must beat on fidelity). Offloaded pages are never read."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from gpu_kernels import paged_decode_attention
from hetero.policies.base import DecodeStep, Policy, pack_tables


@dataclass(slots=True)
class StreamingPolicy(Policy):
    name = "streaming"

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        store = step.store
        hkv = store.cfg.n_kv_heads
        tables = [store.tables[s] for s in step.seq_ids]
        rows = [self.resident_pages(t, layer) for t in tables]
        bt, lens, host = pack_tables(rows, [t.n_tokens for t in tables], store.page_size, hkv, q.device)
        out, _ = paged_decode_attention(q, store.k, store.v, bt, lens, step.scale, store.page_size, host)
        return out
