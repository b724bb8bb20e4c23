"""The engine: chunked prefill and batched decode steps over the paged KV store.

``prefill`` runs one sequence's prompt: chunk by chunk through all layers when its KV stays
on the device, layer by layer when it offloads; ``decode`` runs one token for each sequence
of a batch. Both build the step's metadata once and hand the model (or one of its blocks)
an ``attend`` closure, so the model never sees the cache or the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from gpu_kernels import prefill_attention
from hetero.cache import OFFLOADED, KVStore
from hetero.model import Transformer
from hetero.policies import DecodeStep, Policy, StepPlan, exact_attention

AttentionHook = Callable[[int, Tensor, StepPlan, Tensor], Tensor | None]
"""``hook(layer, q, plan, out)`` after a decode layer's attention; may return the output to
go on with instead of ``out`` (a probe: exact attention)."""


class Engine:
    """Runs the model over the store under the policy.

    Hooks, for measurement (``bench/``) without touching the runtime: ``attention_hooks``
    (see :data:`AttentionHook`) and ``step_hooks`` (``hook(seconds)`` after each decode
    step, with the host's wall time of it: on CUDA, kernels may still be queued)."""

    def __init__(self, model: Transformer, store: KVStore, policy: Policy, prefill_chunk: int):
        if prefill_chunk < store.page_size or prefill_chunk % store.page_size:
            raise ValueError(
                f"prefill_chunk ({prefill_chunk}) must be a multiple of page_size ({store.page_size})"
            )
        self.model, self.store, self.policy = model, store, policy
        self.prefill_chunk = prefill_chunk
        self.scale = model.cfg.head_dim**-0.5
        self.device = store.device.device
        self.attention_hooks: list[AttentionHook] = []
        self.step_hooks: list[Callable[[float], None]] = []

    def _qk_hook(self, seq_ids: list[int]):
        """The model's ``on_qk`` for a policy that wants q and k before RoPE, else None."""
        if not self.policy.raw_qk:
            return None
        return lambda layer, q, k: self.policy.on_qk(layer, seq_ids, q, k)

    @torch.inference_mode()
    def prefill(
        self,
        seq_id: int,
        token_ids: list[int],
        score: bool = False,
        progress: Callable[[int], None] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Write the KV of ``token_ids`` for ``seq_id`` (admitted in the store).

        Returns logits [vocab] (float32) of the last token, or with ``score`` the
        log-probabilities [len(token_ids) - 1] of each token given the ones before it
        (computed chunk by chunk: no [n, vocab] tensor). ``progress(n)`` is called as ``n``
        more of the prompt's tokens are done (by every layer).

        A sequence that keeps its KV on the device is prefilled chunk by chunk through all
        layers; one that offloads, layer by layer (:meth:`_prefill_layers`); under a policy
        with bounded positions, window by window (:meth:`_prefill_windows`), its last token
        then fed as a decode step.

        ``start``: the sequence holds that many tokens already (a saved KV, :meth:`load_kv`);
        ``token_ids`` sit at positions ``start ..`` and attend to them exactly.
        """
        if start and (score or self.policy.bounded_positions):
            raise ValueError(f"a prefill on top of {start} tokens cannot score, nor run under "
                             f"policy {self.policy.name!r}")
        if self.policy.bounded_positions and not score and len(token_ids) > 1:
            # the token whose logits are sampled selects its memory by its own query, as every
            # generated token will: a window's probe speaks for the whole window
            self._prefill_windows(seq_id, token_ids[:-1], False, progress)
            logits = self.decode([seq_id], token_ids[-1:], hooks=False)[0]
            if progress is not None:
                progress(1)
            return logits
        if self.policy.bounded_positions:
            hidden = self._prefill_windows(seq_id, token_ids, score, progress)
        elif self.store.tables[seq_id].offload:
            hidden = self._prefill_layers(seq_id, token_ids, progress, start)
        else:
            hidden = self._prefill_chunks(seq_id, token_ids, score, progress, start)
        if not score:
            return self.model.logits(hidden[-1:])[0]
        outs = []
        for start in range(0, len(token_ids) - 1, self.prefill_chunk):
            rows = hidden[start : min(start + self.prefill_chunk, len(token_ids) - 1)]
            targets = self.store.device.tensor(token_ids[start + 1 : start + 1 + len(rows)], torch.int64)
            logp = torch.log_softmax(self.model.logits(rows), dim=-1)
            outs.append(logp.gather(1, targets[:, None])[:, 0])
        return torch.cat(outs)

    def _prefill_chunks(
        self, seq_id: int, token_ids: list[int], keep_all: bool,
        progress: Callable[[int], None] | None, first: int = 0,
    ) -> Tensor:
        """Chunk-major prefill of a sequence whose KV stays on the device: each chunk runs
        through every layer, attending to the KV written so far in place (``first`` tokens
        of it before ``token_ids``). Returns the final hidden states [n, hidden] (with
        ``keep_all``; else of the last chunk only)."""
        store, model = self.store, self.model
        table = store.tables[seq_id]
        hidden = []
        for offset in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[offset : offset + self.prefill_chunk]
            n, start = len(chunk), first + offset
            store.reserve(seq_id, start + n)
            slots = store.slots(seq_id, start, n)
            block_tables = store.block_tables([seq_id])[:, 0]  # [L, P]

            def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                store.write(slots[layer], k, v)
                return prefill_attention(q, store.k, store.v, block_tables[layer], start,
                                         self.scale, store.page_size)[0]

            tokens = store.device.tensor(chunk, torch.int64)
            positions = torch.arange(start, start + n, device=self.device)
            out = model(tokens, positions, attend, start + n, self._qk_hook([seq_id]))
            hidden = [*hidden, out] if keep_all else [out]
            table.n_tokens = start + n
            if progress is not None:
                progress(n)
        return torch.cat(hidden)

    def _prefill_windows(
        self, seq_id: int, token_ids: list[int], keep_all: bool,
        progress: Callable[[int], None] | None,
    ) -> Tensor:
        """Window-major prefill for a policy with bounded positions (actqkv): each window of
        ``policy.window`` tokens runs through every layer, without RoPE, the policy attending
        over the layer's memory and local window (``attend_window``); then the pages that
        left the local window go to the host tier. A window's cost does not grow with the
        prompt. Returns the final hidden states [n, hidden] (with ``keep_all``; else of the
        last window only)."""
        store, policy = self.store, self.policy
        hidden = []
        for start in range(0, len(token_ids), policy.window):
            chunk = token_ids[start : start + policy.window]
            store.reserve(seq_id, start + len(chunk))
            slots = store.slots(seq_id, start, len(chunk))

            def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                store.write(slots[layer], k, v)
                return policy.attend_window(store, seq_id, layer, start, q, k, self.scale,
                                            last=start + len(chunk) == len(token_ids))

            out = self.model(store.device.tensor(chunk, torch.int64), None, attend)
            hidden = [*hidden, out] if keep_all else [out]
            store.tables[seq_id].n_tokens = start + len(chunk)
            self._evict(seq_id)
            if progress is not None:
                progress(len(chunk))
        return torch.cat(hidden)

    def _prefill_layers(
        self, seq_id: int, token_ids: list[int], progress: Callable[[int], None] | None,
        first: int = 0,
    ) -> Tensor:
        """Layer-major prefill of an offloading sequence: all chunks of layer l, each
        attending causally to the layer's KV so far with the prefill kernel, then layer l's
        pages outside the resident set go to the host tier and the policy may start on the
        layer (MagicPIG's tables) while the device runs layer l+1. The whole prompt's hidden
        states are kept between layers; one layer's KV is on the device at a time.

        With ``stream_prefill`` (not even one layer fits the budget) a layer's pages leave
        after each chunk and later chunks stream them back in blocks (``exact_attention``),
        as do all chunks of a layer that holds offloaded pages of ``first`` tokens written
        before ``token_ids`` (a loaded KV). Returns the final hidden states [n, hidden].
        """
        store, model, policy = self.store, self.model, self.policy
        table, ps, n = store.tables[seq_id], store.page_size, len(token_ids)
        end, n_layers = first + n, len(model.blocks)
        x = model.embed(store.device.tensor(token_ids, torch.int64))
        on_qk = self._qk_hook([seq_id])
        cos, sin = model.rope.tables(torch.arange(first, end, device=self.device), x.dtype, end)
        sink = table.sink_pages
        for layer, block in enumerate(model.blocks):
            # pages of this layer before it are offloaded (or sinks)
            done = table.offloaded.stop if table.offloads_layer(layer) else sink
            for offset in range(0, n, self.prefill_chunk):
                c, start = min(self.prefill_chunk, n - offset), first + offset
                store.reserve(seq_id, start + c, range(layer, layer + 1))
                slots = store.slots(seq_id, start, c, range(layer, layer + 1))[0]
                streamed = done > sink

                def attend(_: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                    store.write(slots, k, v)
                    if streamed:
                        return exact_attention(store, layer, seq_id, q, start, self.scale,
                                               policy.stream_pages)[0]
                    pages = store.device.tensor(table.layers[layer], torch.int32)
                    return prefill_attention(q, store.k, store.v, pages, start, self.scale, ps)[0]

                rows = slice(offset, offset + c)
                x[rows] = block(x[rows], cos[rows], sin[rows], attend, on_qk)
                if table.stream_prefill:
                    done = self._offload(seq_id, layer, done, self._settled(seq_id, start + c))
            self._offload(seq_id, layer, done, self._settled(seq_id, end))
            policy.on_layer_prefilled(store, seq_id, layer, self._settled(seq_id, end))
            if progress is not None:  # the prompt's tokens, shared out over the layers
                progress(n * (layer + 1) // n_layers - n * layer // n_layers)
        table.n_tokens = end
        table.settled = self._settled(seq_id, end)
        return model.norm(x)

    @torch.inference_mode()
    def load_kv(self, seq_id: int, k: list[Tensor], v: list[Tensor]) -> None:
        """Write a saved KV into admitted sequence ``seq_id`` (holding nothing yet) as a
        prefill of its tokens would leave it: ``k``, ``v`` per layer [n, Hkv, D] (any device
        and dtype; keys after RoPE at positions ``0 .. n-1``).

        A sequence that keeps its KV on the device gets it in its pages at once. One that
        offloads gets it layer by layer, each layer's pages outside the resident set then
        leaving for the host tier (``KVStore.offload``, ``Policy.on_offload``: quest's key
        bounds and the page tables come out as after a prefill), chunk by chunk with
        ``stream_prefill``: its device pages never exceed a prefill's. ``on_layer_prefilled``
        is left to the prefill on top (``prefill(..., start=n)``), which calls it for every
        layer over the whole sequence. Counted as host-to-device traffic."""
        store = self.store
        table, n, hkv, d = store.tables[seq_id], k[0].shape[0], store.cfg.n_kv_heads, store.cfg.head_dim
        assert table.n_tokens == 0 and not self.policy.bounded_positions, "loading into a used sequence"
        sink = table.sink_pages
        for layer in range(store.cfg.n_layers):
            done = sink
            step = self.prefill_chunk if table.offload else max(n, 1)
            for start in range(0, n, step):
                c = min(step, n - start)
                store.reserve(seq_id, start + c, range(layer, layer + 1))
                kv = store.device.empty((2, c, hkv, d), store.dtype)
                store.device.to_device(kv, torch.stack((k[layer][start : start + c], v[layer][start : start + c]))
                                       .to(store.dtype))
                store.write(store.slots(seq_id, start, c, range(layer, layer + 1))[0], kv[0], kv[1])
                if table.stream_prefill:
                    done = self._offload(seq_id, layer, done, self._settled(seq_id, start + c))
            self._offload(seq_id, layer, done, self._settled(seq_id, n))
        table.n_tokens = n
        table.settled = self._settled(seq_id, n)

    @torch.inference_mode()
    def export_kv(self, seq_id: int) -> tuple[list[Tensor], list[Tensor]]:
        """The KV of every token of ``seq_id``, per layer k and v [n, Hkv, D] on the CPU (the
        store's dtype), read from its device pages and its host tier."""
        store = self.store
        table, ps, n = store.tables[seq_id], store.page_size, store.tables[seq_id].n_tokens
        host = store.host_tier(seq_id) if table.offload else None
        ks, vs = [], []
        for pages in table.layers:
            pages = pages[: -(-n // ps)]
            if host is not None:
                kv = host[len(ks), :, :, : len(pages) * ps].clone()  # [2, Hkv, n_pages * ps, D]
            else:
                kv = torch.empty((2, store.cfg.n_kv_heads, len(pages) * ps, store.cfg.head_dim), dtype=store.dtype)
            resident = [i for i, p in enumerate(pages) if p != OFFLOADED]
            if resident:
                src = torch.tensor([pages[i] * ps + j for i in resident for j in range(ps)])
                dst = torch.tensor([i * ps + j for i in resident for j in range(ps)])
                kv[:, :, dst] = store.kv.index_select(2, store.device.tensor(src, torch.int64)).cpu()
            ks.append(kv[0, :, :n].transpose(0, 1).contiguous())
            vs.append(kv[1, :, :n].transpose(0, 1).contiguous())
        return ks, vs

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], token_ids: list[int], hooks: bool = True) -> Tensor:
        """Feed one token per sequence; returns logits [B, vocab] (float32).

        The policy plans the step once (every layer's tables, from host-side state), then
        runs each layer; nothing inside the layer loop reads the device back. ``hooks``
        False: a prompt's last token fed as a step (windowed prefill), unseen by the hooks."""
        t0 = time.perf_counter()
        store = self.store
        positions = [store.tables[s].n_tokens for s in seq_ids]
        for s, p in zip(seq_ids, positions):
            store.reserve(s, p + 1)
        slots = torch.cat([store.slots(s, p, 1) for s, p in zip(seq_ids, positions)], dim=1)
        for s in seq_ids:  # the new token takes part in attention
            store.tables[s].n_tokens += 1
        plan = self.policy.plan(DecodeStep(store, seq_ids, [p + 1 for p in positions], self.scale))

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            store.write(slots[layer], k, v)
            out = self.policy.run(layer, q, plan)
            for hook in self.attention_hooks if hooks else ():
                new = hook(layer, q, plan, out)
                out = out if new is None else new
            return out

        tokens = store.device.tensor([*token_ids, *positions], torch.int64)
        rotary = None if self.policy.bounded_positions else tokens[len(seq_ids) :]
        hidden = self.model(tokens[: len(seq_ids)], rotary, attend, max(positions) + 1, self._qk_hook(seq_ids))
        for s in seq_ids:
            self._evict(s)
        logits = self.model.logits(hidden)
        for hook in self.step_hooks if hooks else ():
            hook(time.perf_counter() - t0)
        return logits

    def release(self, seq_id: int) -> None:
        """Free a sequence: the policy's state of it, then its KV."""
        self.policy.on_release(seq_id)
        self.store.release(seq_id)

    def _evict(self, seq_id: int) -> None:
        """Offload the pages of the sparse layers that left the local window."""
        table = self.store.tables[seq_id]
        settled = self._settled(seq_id, table.n_tokens)
        first = table.offloaded.stop  # where the offloaded run ends now
        for layer in range(self.model.cfg.n_layers):
            self._offload(seq_id, layer, first, settled)
        table.settled = max(table.settled, settled)

    def _settled(self, seq_id: int, n_tokens: int) -> int:
        """The sequence's ``settled`` once it holds ``n_tokens``: pages before it are
        offloaded (sparse layers of an offloading sequence) or stay for good (sinks)."""
        table, ps = self.store.tables[seq_id], self.store.page_size
        if not table.offload:
            return table.settled
        return max(table.settled, self.policy.first_local(n_tokens, ps))

    def _offload(self, seq_id: int, layer: int, first: int, settled: int) -> int:
        """Offload one layer's pages ``first..settled-1`` (dense layers keep theirs and
        sequences that do not offload keep everything); returns the new ``first``."""
        table = self.store.tables[seq_id]
        if not table.offload or layer < self.policy.dense_layers:
            return first
        pages = list(range(first, settled))
        k = self.store.offload(seq_id, layer, pages)
        if k is not None:
            self.policy.on_offload(self.store, seq_id, layer, pages, k)
        return max(first, settled)
