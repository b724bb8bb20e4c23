"""Quest (page top-k): score offloaded pages by the upper bound of q·k from their key
min/max, fetch each KV head's top pages into the layer's head cache, attend over sinks +
top pages + local window. ``token_budget`` counts every attended token; the first
``dense_layers`` layers stay exact (Quest keeps two).

The policy owns its per-sequence state, in device pages it takes from the store's budget:
per layer, the key bounds of the offloaded pages (written as pages leave, ``on_offload``)
and the head cache (:class:`HeadSlots`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpu_kernels import paged_decode_attention, quest_page_scores
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.policies.base import DecodeStep, Policy, pack_tables

HEAD_CACHE_SPARE = 2
"""Pages a layer's head cache holds beyond its first selection and resident copies: the
window's page count varies by one or two from step to step."""


@dataclass(slots=True)
class HeadSlots:
    """One layer's cache of pages picked per KV head: in KV head ``h``, device page
    ``pages[j]`` holds offloaded page ``held[h, j]`` of the layer (-1: nothing yet). Each
    head holds its own pages in the same device pages, so attention reads them as one list.
    ``held`` (int64 [Hkv, k]) and ``first`` (``pages[:k]``, int64 [k]) live on the device:
    the picks that update them never come back to the host."""

    pages: list[int]
    held: Tensor
    first: Tensor


@dataclass(slots=True)
class _SeqState:
    """Quest's device pages for one sequence, per layer: ``bounds[l]`` (slot ``j`` of bounds
    page ``m`` holds, in K, the key min and, in V, the key max of page ``m*page_size + j``;
    one run, so scoring reads a view) and ``heads[l]``."""

    bounds: list[list[int]]
    heads: list[HeadSlots | None]

    def pages(self) -> list[int]:
        return [p for b in self.bounds for p in b] + [p for h in self.heads if h is not None for p in h.pages]


@dataclass(slots=True)
class QuestPolicy(Policy):
    name = "quest"
    n_local: int = 64
    dense_layers: int = 2
    token_budget: int = 1024
    _store: KVStore | None = field(default=None, init=False, repr=False)
    _seqs: dict[int, _SeqState] = field(default_factory=dict, init=False, repr=False)

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
        # the head cache: the top pages, each KV head's picks in the same pages, then copies
        # of the resident pages (sinks, window, the page leaving it)
        resident = self.sink_pages(page_size) + self.n_local // page_size + 2
        return self.top_pages(page_size) + resident + HEAD_CACHE_SPARE

    def offload_pages(self, n_pages: int, page_size: int) -> int:
        return -(-n_pages // page_size)  # key bounds: one slot per page

    # -- state ---------------------------------------------------------------------------

    def bind(self, backend, store: KVStore) -> None:
        self._store, self._seqs = store, {}

    def on_offload(self, store: KVStore, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        """Keep the per-channel key min and max of pages ``page_idx`` (keys ``k`` [Hkv, n,
        page_size, D]) in the layer's bounds pages."""
        ps = store.page_size
        state = self._state(store, seq_id)
        bounds = state.bounds[layer]
        if not bounds:  # one run for the whole sequence
            bounds += store.allocate(-(-store.tables[seq_id].capacity // ps // ps))
        slots = torch.tensor([bounds[i // ps] * ps + i % ps for i in page_idx], device=store.k.device)
        store.k.index_copy_(1, slots, k.amin(dim=2))
        store.v.index_copy_(1, slots, k.amax(dim=2))

    def on_release(self, seq_id: int) -> None:
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self._store.free(state.pages())

    def _state(self, store: KVStore, seq_id: int) -> _SeqState:
        if self._store is None:
            self._store = store
        n = store.cfg.n_layers
        return self._seqs.setdefault(seq_id, _SeqState([[] for _ in range(n)], [None] * n))

    def key_bounds(self, store: KVStore, seq_id: int, layer: int) -> tuple[Tensor, Tensor]:
        """Per-page key min and max [Hkv, n_pages, D] of one layer (meaningful for offloaded
        pages only)."""
        bounds, ps, n_pages = self._seqs[seq_id].bounds[layer], store.page_size, store.tables[seq_id].n_pages
        if bounds[-1] - bounds[0] == len(bounds) - 1:  # contiguous (ids come sorted)
            span = slice(bounds[0] * ps, bounds[0] * ps + n_pages)
            return store.k[:, span], store.v[:, span]
        index = torch.tensor(bounds, device=store.k.device)
        return tuple(t.view(t.shape[0], -1, ps, t.shape[-1]).index_select(1, index).flatten(1, 2)[:, :n_pages]
                     for t in (store.k, store.v))

    def fetch_heads(self, store: KVStore, seq_id: int, layer: int, picks: Tensor, resident: list[int]) -> list[int]:
        """Device pages holding what attention reads of one layer, in token order: in each
        KV head ``h`` the offloaded pages ``picks[h]`` (int64 [Hkv, k] on the device,
        distinct within a head, in no particular order), then copies of the device pages
        ``resident`` (sinks and window; the last may be partial).

        The pages are the layer's head cache, one run of device pages when the allocator
        has one, so the CPU path reads them as one view and gathers nothing. A head keeps
        the offloaded pages it holds and still wants where they are, and its new pages are
        copied from the host tier into the slots of those it no longer wants: it pays for a
        page only when it picks it anew. Which pages each head holds is device state,
        updated by tensor ops: the host never reads the picks (on the CPU nothing is read
        back; on CUDA the host-tier gather waits for the misses' ids). The resident pages
        are copied on the device. Hits and misses count pages of one KV head.
        """
        state = self._state(store, seq_id)
        hkv, k = picks.shape
        slots = state.heads[layer]
        if slots is None or slots.held.shape[1] != k or len(slots.pages) < k + len(resident):
            if slots is not None:  # the selection grew, or the window: start afresh
                store.free(slots.pages)
            pages = store.allocate(k + len(resident) + HEAD_CACHE_SPARE)
            held = torch.full((hkv, k), -1, dtype=torch.int64, device=picks.device)
            slots = state.heads[layer] = HeadSlots(pages, held, torch.tensor(pages[:k], device=picks.device))
        n_host = -(-store.tables[seq_id].capacity // store.page_size)  # pages of the host tier
        held = torch.where(slots.held < 0, n_host, slots.held)  # n_host: nothing held
        wanted = torch.zeros((hkv, n_host + 1), dtype=torch.bool, device=picks.device)
        have = torch.zeros_like(wanted)
        keep = wanted.scatter_(1, picks, True).gather(1, held)  # held pages still wanted
        fresh = ~have.scatter_(1, held, True).gather(1, picks)  # picks not held
        # pair each head's j-th fresh pick with its j-th free slot (as many of each)
        new = picks.gather(1, torch.argsort((~fresh).to(torch.uint8), dim=1, stable=True))
        free = torch.argsort(keep.to(torch.uint8), dim=1, stable=True)
        valid = torch.arange(k, device=picks.device) < fresh.sum(1, keepdim=True)
        slots.held.scatter_(1, free, torch.where(valid, new, slots.held.gather(1, free)))
        heads = torch.arange(hkv, device=picks.device)[:, None].expand(hkv, k)[valid]
        src, dst = new[valid], slots.first[free][valid]
        store.cache_hits += hkv * k - src.numel()
        store.cache_misses += src.numel()
        if src.numel():
            store.load_head_pages(seq_id, layer, heads, src, dst)
        picked = slots.pages[: k + len(resident)]
        store.copy_pages(picked[k:], resident)
        return picked

    # -- attention -----------------------------------------------------------------------

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
            kmin, kmax = self.key_bounds(store, s, layer)
            scores = quest_page_scores(q[b], kmin, kmax)[:, run.start : run.stop]
            top = scores.topk(min(self.top_pages(ps), len(run)), dim=1, sorted=False)
            # [Hkv, k] page indices, kept on the device; each KV head's picks land in the same
            # device pages, followed by copies of the resident ones: one page list for all heads
            rows.append(self.fetch_heads(store, s, layer, top.indices.add_(run.start), resident))
        bt, lens, host = pack_tables(rows, [store.tables[s].n_tokens for s in step.seq_ids], ps,
                                     store.cfg.n_kv_heads, q.device)
        out, _ = paged_decode_attention(q, store.k, store.v, bt, lens, step.scale, ps, host)
        return out
