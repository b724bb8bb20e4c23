"""Quest (page top-k): score offloaded pages by the upper bound of q·k from their key
min/max, fetch each KV head's top pages into the layer's head cache, attend over sinks +
top pages + local window. ``token_budget`` counts every attended token; the first
``dense_layers`` layers stay exact (Quest keeps two).

The local window takes a 16th of the budget by default (16 to 64 tokens: 64 from a budget of
1024): at 10% of 1.5k tokens a 64-token window left the picks 85 tokens and answered 78 of
90 needles, 38 tokens 82, 16 tokens 86 (dense 88); on held-out depths, at 20% of 1.5k and at
10% of 8k the window's size made no more than one needle's difference (docs/benchmarks.md).

A small selection runs on 8-token pages (``page_size``, the LLM's unless it sets one): on
the needle suite (``bench.needle_suite``) at 10% of 1.5k tokens (153), 16-token pages
answered 65 of 90 needles, 8-token pages 82 and dense 88 (a bound over 16 varied tokens is
too loose to rank the needle's page, and each pick brings 16 tokens). There they cost no
measurable decode time; on a 1024-token selection they cost 10-16% at 8k-32k (twice the
bounds to score and the pages to fetch), so a selection of at least ``FINE_PAGES_BELOW``
16-token pages keeps them (docs/benchmarks.md).

The policy owns its per-sequence state, in device pages it takes from the store's budget:
per layer, the key bounds of the offloaded pages (written as pages leave, ``on_offload``)
and the head cache (:class:`HeadSlots`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cpu_kernels.head_cache import update_head_cache
from gpu_kernels import gather_head_pages, paged_decode_attention, quest_page_scores
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.policies.base import DecodeStep, PagedState, Policy, StepPlan

FINE_PAGES_BELOW = 32
"""Top pages (of 16 tokens) under which quest runs on 8-token pages."""

WINDOW_SHARE = 16
"""The local window's default: 1/16 of ``token_budget``, 16 to 64 tokens."""

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
class QuestPolicy(PagedState, Policy):
    name = "quest"
    n_local: int | None = None  # None: a 16th of token_budget, 16 to 64 tokens
    dense_layers: int = 2
    token_budget: int = 1024
    _store: KVStore | None = field(default=None, init=False, repr=False)
    _seqs: dict[int, _SeqState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.token_budget, int) or isinstance(self.token_budget, bool):
            raise ValueError(f"quest: token_budget must be an integer, got {self.token_budget!r}")
        if self.n_local is None:
            self.n_local = min(64, max(16, self.token_budget // WINDOW_SHARE))
        Policy.__post_init__(self)
        if self.token_budget < self.n_sink + self.n_local:
            raise ValueError(
                f"quest: token_budget {self.token_budget} is below n_sink + n_local "
                f"({self.n_sink + self.n_local}): raise it or shrink the window"
            )

    @property
    def page_size(self) -> int:
        """Tokens per page this selection runs on: 8 when it picks fewer than
        ``FINE_PAGES_BELOW`` pages of 16 tokens, else 16."""
        return 8 if self.top_pages(16) < FINE_PAGES_BELOW else 16

    def top_pages(self, page_size: int) -> int:
        """Offloaded pages each KV head attends to (at least 3, as in Quest)."""
        return max(3, (self.token_budget - self.n_sink - self.n_local) // page_size)

    def offloads(self, fits: bool, n_tokens: int, page_size: int) -> bool:
        # a sequence whose offloadable pages never outnumber the top pages would have every
        # one of them fetched back at each step: it stays whole on the device (exact) if it fits
        offloadable = self.first_local(n_tokens, page_size) - self.sink_pages(page_size)
        return not fits or offloadable > self.top_pages(page_size)

    def cache_pages(self, cfg: ModelConfig, page_size: int, n_pages: int) -> int:
        # the head cache: the top pages (no more than there are), each KV head's picks in the
        # same pages, then copies of the resident pages (sinks, window, the page leaving it)
        return (min(self.top_pages(page_size), n_pages) + self.resident_share(n_pages, page_size)
                + HEAD_CACHE_SPARE)

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
        slots = store.device.tensor([bounds[i // ps] * ps + i % ps for i in page_idx], torch.int64)
        store.k.index_copy_(1, slots, k.amin(dim=2))
        store.v.index_copy_(1, slots, k.amax(dim=2))

    def export_state(self, seq_id: int) -> dict[str, Tensor]:
        """The key bounds of every layer that has offloaded pages, as ``bounds.<layer>``
        [2, Hkv, n_pages, D] (min, max) CPU tensors (head caches refill as they are used)."""
        state = self._seqs.get(seq_id)
        if state is None:
            return {}
        store = self._store
        return {f"bounds.{layer}": torch.stack(self.key_bounds(store, seq_id, layer)).cpu()
                for layer, b in enumerate(state.bounds) if b}

    def import_state(self, store: KVStore, seq_id: int, state: dict[str, Tensor]) -> None:
        ps = store.page_size
        for name, bounds in state.items():
            layer = int(name.removeprefix("bounds."))
            n_pages = bounds.shape[2]
            pages = self._state(store, seq_id).bounds[layer]
            if not pages:
                pages += store.allocate(-(-store.tables[seq_id].capacity // ps // ps))
            slots = store.device.tensor([pages[i // ps] * ps + i % ps for i in range(n_pages)], torch.int64)
            store.k.index_copy_(1, slots, bounds[0].to(store.k))
            store.v.index_copy_(1, slots, bounds[1].to(store.v))

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
        index = store.device.tensor(bounds, torch.int64)
        return tuple(t.view(t.shape[0], -1, ps, t.shape[-1]).index_select(1, index).flatten(1, 2)[:, :n_pages]
                     for t in (store.k, store.v))

    def fetch_heads(self, store: KVStore, seq_id: int, layer: int, picks: Tensor, resident: list[int]) -> list[int]:
        """Device pages holding what attention reads of one layer, in token order: in each
        KV head ``h`` the offloaded pages ``picks[h]`` (int64 [Hkv, k] on the device,
        distinct within a head, in no particular order), then copies of the device pages
        ``resident`` (sinks and window; the last may be partial).

        The pages are the layer's head cache (:meth:`head_slots`), one run of device pages
        when the allocator has one, so the CPU path reads them as one view and gathers
        nothing. A head keeps the offloaded pages it holds and still wants where they are;
        its new picks are copied from the host tier into the slots of those it no longer
        wants (:func:`fetch_head_pages`): it pays for a page only when it picks it anew.
        The host never reads the picks. Hits and misses count pages of one KV head."""
        slots = self.head_slots(store, seq_id, layer, picks.shape[1], len(resident))
        fetch_head_pages(store, seq_id, layer, slots, picks)
        picked = slots.pages[: picks.shape[1] + len(resident)]
        store.copy_pages(store.device.tensor([picked[picks.shape[1]:], resident], torch.int64))
        return picked

    def head_slots(self, store: KVStore, seq_id: int, layer: int, k: int, n_resident: int) -> HeadSlots:
        """The layer's head cache for ``k`` picks per head and ``n_resident`` resident pages,
        (re)allocated when the selection or the window outgrows it (host-side: the plan
        calls it)."""
        state = self._state(store, seq_id)
        slots = state.heads[layer]
        if slots is None or slots.held.shape[1] != k or len(slots.pages) < k + n_resident:
            if slots is not None:  # the selection grew, or the window: start afresh
                store.free(slots.pages)
            pages = store.allocate(k + n_resident + HEAD_CACHE_SPARE)
            held = torch.full((store.cfg.n_kv_heads, k), -1, dtype=torch.int64, device=store.kv.device)
            slots = state.heads[layer] = HeadSlots(pages, held, store.device.tensor(pages[:k], torch.int64))
        return slots

    # -- attention -----------------------------------------------------------------------

    def plan(self, step: DecodeStep) -> _QuestPlan:
        """Per sparse layer and offloading sequence: the head cache's pages (the layer's
        table: each head's picks, then copies of the resident pages), how many pages each
        head picks, and the resident pages to copy, all from host-side state; one upload for
        every layer's tables, one for the copies."""
        store, ps = step.store, step.store.page_size
        rows, work, copies = {}, [[] for _ in range(store.cfg.n_layers)], []
        tables = step.tables
        sparse = range(self.dense_layers, store.cfg.n_layers) if any(t.offloaded for t in tables) else ()
        for layer in sparse:
            layer_rows = []
            for b, (s, t) in enumerate(zip(step.seq_ids, tables)):
                resident, run = self.resident_pages(t, layer), t.offloaded
                if not run:
                    layer_rows.append(resident)
                    continue
                k = min(self.top_pages(ps), len(run))
                slots = self.head_slots(store, s, layer, k, len(resident))
                work[layer].append(_Work(b, s, run, slots, len(copies), len(copies) + len(resident)))
                copies += zip(slots.pages[k : k + len(resident)], resident)
                layer_rows.append(slots.pages[: k + len(resident)])
            rows[layer] = layer_rows
        copy_idx = store.device.tensor(list(zip(*copies)) or [[], []], torch.int64)  # [2, n]: dst, src
        return _QuestPlan(step, self.layer_tables(step, rows), work, copy_idx)

    def run(self, layer: int, q: Tensor, plan: _QuestPlan) -> Tensor:
        store, ps = plan.step.store, plan.step.store.page_size
        work = plan.work[layer]
        for w in work:
            kmin, kmax = self.key_bounds(store, w.seq_id, layer)
            scores = quest_page_scores(q[w.b], kmin, kmax)[:, w.run.start : w.run.stop]
            top = scores.topk(w.slots.held.shape[1], dim=1, sorted=False)
            fetch_head_pages(store, w.seq_id, layer, w.slots, top.indices.add_(w.run.start))
        if work:  # copies of the resident pages (this step's k and v are written now)
            store.copy_pages(plan.copies[:, work[0].copies : work[-1].copies_end])
        tables = plan.layers[layer]
        out, _ = paged_decode_attention(q, store.k, store.v, tables.block_table, tables.kv_lens,
                                        plan.step.scale, ps, tables.host)
        return out


@dataclass(slots=True)
class _Work:
    """One offloading sequence's share of a sparse layer: batch row ``b``, the offloaded run
    it selects from, its head cache, and its resident copies ``[copies, copies_end)`` of
    the plan's copy list."""

    b: int
    seq_id: int
    run: range
    slots: HeadSlots
    copies: int
    copies_end: int


@dataclass(slots=True)
class _QuestPlan(StepPlan):
    work: list[list[_Work]]
    copies: Tensor


def fetch_head_pages(store: KVStore, seq_id: int, layer: int, slots: HeadSlots, picks: Tensor) -> None:
    """Make each KV head of the layer's head cache ``slots`` hold its ``picks`` [Hkv, k]:
    keep the pages it holds and still picks, copy its new picks from the host tier into the
    slots of the others. Counts the misses (and bytes) without reading them back.

    CPU: one numba call (``cpu_kernels.head_cache``). CUDA: tensor ops pair each head's new
    picks with its free slots, and ``gather_head_pages`` reads them from the pinned host tier
    (mapped into the device's address space) with a fixed-size launch: no host sync."""
    hkv, k = picks.shape
    host, pool = store.host[seq_id][layer], store.kv
    head_page = 2 * store.page_size * store.cfg.head_dim * store.dtype.itemsize  # K and V, one head
    if not pool.is_cuda:
        raw = torch.int16 if store.dtype.itemsize == 2 else torch.int32
        misses = update_head_cache(host.view(raw).numpy(), pool.view(raw).numpy(), slots.held.numpy(),
                                   slots.first.numpy(), picks.numpy(), store.page_size)
    else:
        n_host = host.shape[2] // store.page_size
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
        store.device.wait_host_copies()  # the offloads that wrote the host tier have landed
        gather_head_pages(host, pool, new, slots.first[free], valid, store.page_size)
        misses = valid.sum()
    store.hits.add(hkv * k - misses)
    store.misses.add(misses)
    store.device.traffic.h2d.add(misses * head_page)
