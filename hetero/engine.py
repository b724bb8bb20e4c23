"""The engine: chunked prefill and batched decode steps over the paged KV store.

``prefill`` runs one sequence's prompt chunk by chunk; ``decode`` runs one token for each
sequence of a batch. Both build the step's metadata once and hand the model an ``attend``
closure, so the model never sees the cache or the policy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gpu_kernels import prefill_attention
from hetero.cache import OFFLOADED, KVStore
from hetero.model import Transformer
from hetero.policies import DecodeStep, Policy, exact_attention


class Engine:
    def __init__(self, model: Transformer, store: KVStore, policy: Policy, prefill_chunk: int):
        if prefill_chunk < store.page_size or prefill_chunk % store.page_size:
            raise ValueError(
                f"prefill_chunk ({prefill_chunk}) must be a multiple of page_size ({store.page_size})"
            )
        self.model, self.store, self.policy = model, store, policy
        self.prefill_chunk = prefill_chunk
        self.scale = model.cfg.head_dim**-0.5
        self.device = store.device.device

    @torch.inference_mode()
    def prefill(
        self,
        seq_id: int,
        token_ids: list[int],
        score: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Write the KV of ``token_ids`` for ``seq_id`` (admitted in the store).

        Returns logits [vocab] (float32) of the last token, or with ``score`` the
        log-probabilities [len(token_ids) - 1] of each token given the ones before it
        (computed chunk by chunk: no [n, vocab] tensor). ``progress(n)`` is called after
        each chunk of ``n`` tokens.
        """
        store, model = self.store, self.model
        table = store.tables[seq_id]
        outs = []
        for start in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[start : start + self.prefill_chunk]
            n = len(chunk)
            last = start + n == len(token_ids) and not score
            store.reserve(seq_id, start + n)
            slots = store.slots(seq_id, start, n)
            block_tables = store.block_tables([seq_id])[:, 0]  # [L, P]
            offloaded = [OFFLOADED in pages for pages in table.layers]
            settled = self._settled(seq_id, start + n)

            def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                store.write(slots[layer], k, v)
                if offloaded[layer]:
                    out, _ = exact_attention(
                        store, layer, seq_id, q, start, self.scale,
                        self.policy.stream_pages,
                    )
                else:
                    out, _ = prefill_attention(
                        q, store.k, store.v, block_tables[layer], start, self.scale,
                        store.page_size,
                    )
                # the layer is done with this chunk: its pages that left the window go
                # now, and after the last chunk the policy may start on the layer while
                # the device moves on to the next one
                self._offload(seq_id, layer, settled)
                if last:
                    self.policy.on_prefill_layer_done(store, seq_id, layer, settled)
                return out

            tokens = torch.tensor(chunk, device=self.device)
            positions = torch.arange(start, start + n, device=self.device)
            hidden = model(tokens, positions, attend)
            table.n_tokens = start + n
            table.settled = max(table.settled, settled)
            if score:
                targets = torch.tensor(token_ids[start + 1 : start + n + 1], device=self.device)
                logp = torch.log_softmax(model.logits(hidden[: len(targets)]), dim=-1)
                outs.append(logp.gather(1, targets[:, None])[:, 0])
            elif start + n == len(token_ids):
                outs.append(model.logits(hidden[-1:])[0])
            if progress is not None:
                progress(n)
        return torch.cat(outs) if score else outs[0]

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], token_ids: list[int]) -> Tensor:
        """Feed one token per sequence; returns logits [B, vocab] (float32)."""
        store, cfg = self.store, self.model.cfg
        positions = [store.tables[s].n_tokens for s in seq_ids]
        for s, p in zip(seq_ids, positions):
            store.reserve(s, p + 1)
        slots = torch.cat([store.slots(s, p, 1) for s, p in zip(seq_ids, positions)], dim=1)
        b = len(seq_ids)
        step = DecodeStep(
            store=store,
            seq_ids=seq_ids,
            kv_lens=torch.tensor(positions, dtype=torch.int32, device=self.device)[:, None]
            .add(1)
            .expand(b, cfg.n_kv_heads),
            scale=self.scale,
        )

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            store.write(slots[layer], k, v)
            return self.policy.attend_decode(layer, q, step)

        for s in seq_ids:  # policies read n_tokens: the new token takes part in attention
            store.tables[s].n_tokens += 1
        tokens = torch.tensor(token_ids, device=self.device)
        hidden = self.model(tokens, torch.tensor(positions, device=self.device), attend)
        for s in seq_ids:
            self._evict(s)
        return self.model.logits(hidden)

    def release(self, seq_id: int) -> None:
        """Free a sequence: the policy's state of it, then its KV."""
        self.policy.on_release(seq_id)
        self.store.release(seq_id)

    def _evict(self, seq_id: int) -> None:
        """Offload the pages of the sparse layers that left the local window."""
        table = self.store.tables[seq_id]
        settled = self._settled(seq_id, table.n_tokens)
        for layer in range(self.model.cfg.n_layers):
            self._offload(seq_id, layer, settled)
        table.settled = max(table.settled, settled)

    def _settled(self, seq_id: int, n_tokens: int) -> int:
        """The sequence's ``settled`` once it holds ``n_tokens``: pages before it are
        offloaded (sparse layers of an offloading sequence) or stay for good (sinks)."""
        table, ps = self.store.tables[seq_id], self.store.page_size
        if not table.offload:
            return table.settled
        return max(table.settled, self.policy.first_local(n_tokens, ps))

    def _offload(self, seq_id: int, layer: int, settled: int) -> None:
        """Offload one layer's pages from the sinks (or ``table.settled``) up to ``settled``;
        dense layers keep theirs."""
        table = self.store.tables[seq_id]
        if not table.offload or layer < self.policy.dense_layers:
            return
        first = max(table.settled, self.policy.sink_pages(self.store.page_size))
        self.store.offload(seq_id, layer, list(range(first, settled)))
