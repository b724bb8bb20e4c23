"""The paged KV store: one device pool per layer under a byte budget, and a host tier.

The device pool has the layout the attention kernels read: ``[Hkv, n_slots, D]`` for K and
for V, ``n_slots = n_pages * page_size``, shared by all layers (each layer has its own
pages). The host tier keeps a sequence's offloaded pages by token position (``[L, 2, Hkv,
capacity, D]``, K then V), the layout CPU workers scan. K and V are views of one tensor in
both tiers, so one copy moves a page's K and V. Every copy between the tiers goes through
:class:`hetero.device.Device`, which counts the bytes and, on CUDA, runs it on the copy
stream; the CPU reads the host tier only through :meth:`KVStore.host_tier` and
:meth:`hetero.device.Device.host_gather`, which wait for those copies to land.

On CUDA the pool grows with use (``grow``): it starts empty and is reallocated, larger, when
a page beyond it is handed out, up to the budget, so an idle ``LLM`` holds no device memory
for KV. On the CPU it is allocated at the budget's size at once: the operating system
commits its memory only as pages are written, which is growth with use without copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.cache.pages import OFFLOADED, OutOfPages, PageAllocator, SeqPages
from hetero.config import ModelConfig
from hetero.device import Counter, Device, format_size


@dataclass(slots=True)
class MemoryReport:
    device_kv_budget: int
    device_kv_bytes: int
    device_kv_bytes_peak: int
    device_pool_bytes: int  # memory the pool holds (on CUDA it grows with use)
    host_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    cache_hits: int
    cache_misses: int


class KVStore:
    """Device pool of KV pages under ``budget`` bytes, per-sequence page tables, host tier."""

    def __init__(
        self, cfg: ModelConfig, device: Device, dtype: torch.dtype, page_size: int, budget: int,
        grow: bool | None = None,
    ):
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.cfg, self.device, self.dtype, self.page_size = cfg, device, dtype, page_size
        self.page_bytes = 2 * cfg.n_kv_heads * page_size * cfg.head_dim * dtype.itemsize
        n_pages = budget // self.page_bytes
        if n_pages < cfg.n_layers:
            raise ValueError(
                f"device_kv_budget {format_size(budget)} is below one page per layer "
                f"({format_size(cfg.n_layers * self.page_bytes)} for page_size={page_size}): "
                f"raise the budget"
            )
        self.budget = budget
        self.allocator = PageAllocator(n_pages)
        self.grows = device.is_cuda if grow is None else grow
        self._set_pool(self._new_pool(0 if self.grows else n_pages))
        self.tables: dict[int, SeqPages] = {}
        self.host: dict[int, Tensor] = {}  # [L, 2, Hkv, capacity, D] per offloading sequence
        self._rows: dict[int, Tensor] = {}  # device copy of each sequence's page tables
        self.hits, self.misses = Counter(), Counter()  # page-cache lookups, in pages of one KV head

    # -- sequences -----------------------------------------------------------------------

    def reserve(self, seq_id: int, n_tokens: int, layers: range | None = None) -> SeqPages:
        """Make room on the device for ``n_tokens`` tokens of ``seq_id`` in ``layers``
        (default: every layer)."""
        table = self.tables.get(seq_id) or self.admit(seq_id, n_tokens, offload=False)
        layers = range(self.cfg.n_layers) if layers is None else layers
        want = -(-n_tokens // self.page_size)
        need = {layer: want - len(table.layers[layer]) for layer in layers
                if len(table.layers[layer]) < want}
        if not need:
            return table
        n_new = sum(max(0, n - len(table.ahead[layer])) for layer, n in need.items())
        if n_new > self.allocator.n_free:
            raise OutOfPages(
                f"the KV of {n_tokens} tokens needs "
                f"{format_size(n_new * self.page_bytes)} more on the device, "
                f"but only {format_size(self.allocator.n_free * self.page_bytes)} of the "
                f"device_kv_budget {format_size(self.budget)} is free: raise device_kv_budget, "
                f"shorten the prompt or max_new_tokens, or send fewer prompts"
            )
        entries = []
        for layer, n in need.items():
            # one run per layer when free: the CPU path reads it as one view
            ahead, pages = table.ahead[layer], table.layers[layer]
            new = ahead[:n] + self._allocate(max(0, n - len(ahead)))
            entries += [(layer, len(pages) + i, p) for i, p in enumerate(new)]
            pages += new
            del ahead[:n]
        self._set_rows(seq_id, entries)
        return table

    def prepare(self, n_pages: int) -> None:
        """Grow the pool now to hold ``n_pages`` pages beyond those in use (pages promised to
        an admitted request), rather than bit by bit as they are taken."""
        if self.grows and self.allocator.n_used + n_pages > self.n_pool_pages:
            self._grow(self.allocator.n_used + n_pages)

    def release(self, seq_id: int) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.allocator.free(table.on_device())
        self.host.pop(seq_id, None)
        self._rows.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, n: int, layers: range | None = None) -> Tensor:
        """Pool slots [len(layers), n] (int64, device) of positions ``start..start+n-1`` per
        layer of ``layers`` (default: every layer)."""
        table = self.tables[seq_id]
        ps = self.page_size
        first, last = start // ps, (start + n - 1) // ps
        rows = [pages[first : last + 1] for pages in
                (table.layers if layers is None else [table.layers[layer] for layer in layers])]
        assert all(p >= 0 for row in rows for p in row), "writing to a page that is not on the device"
        pages = torch.tensor(rows)  # [L, n_pages]
        pos = torch.arange(start, start + n)
        return self.device.tensor(pages[:, pos // ps - first] * ps + pos % ps, torch.int64)

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one layer's ``k``, ``v`` [N, Hkv, D] at pool ``slots`` [N]."""
        self.k.index_copy_(1, slots, k.transpose(0, 1))
        self.v.index_copy_(1, slots, v.transpose(0, 1))

    def block_tables(self, seq_ids: list[int], width: int | None = None) -> Tensor:
        """Page ids [L, B, width] (int32, device) of each layer and sequence, -1 for offloaded
        pages and padding; ``width`` defaults to the most pages of any of them. Read from the
        device copy of the page tables that :meth:`reserve` and :meth:`offload` keep up to
        date: nothing is built from Python lists per call."""
        width = max(self.tables[s].n_pages for s in seq_ids) if width is None else width
        rows = [self._device_rows(s, width)[:, :width] for s in seq_ids]
        return rows[0][:, None] if len(rows) == 1 else torch.stack(rows, dim=1)

    def _device_rows(self, seq_id: int, width: int = 0) -> Tensor:
        """The device copy [L, capacity] of ``seq_id``'s page tables (-1 past its pages),
        at least ``width`` wide."""
        rows = self._rows.get(seq_id)
        if rows is None or rows.shape[1] < width:
            table = self.tables[seq_id]
            cap = max(width, -(-table.capacity // self.page_size), table.n_pages,
                      0 if rows is None else 2 * rows.shape[1])
            new = torch.full((self.cfg.n_layers, cap), OFFLOADED, dtype=torch.int32, device=self.device.device)
            if rows is not None:
                new[:, : rows.shape[1]] = rows
            rows = self._rows[seq_id] = new
        return rows

    def _set_rows(self, seq_id: int, entries: list[tuple[int, int, int]]) -> None:
        """Write ``(layer, page index, device page)`` entries into the device copy of the
        page tables: one upload, one scatter."""
        if entries:
            rows = self._device_rows(seq_id, max(i for _, i, _ in entries) + 1)
            layer, idx, page = self.device.tensor(entries, torch.int64).unbind(1)
            rows.index_put_((layer, idx), page.to(torch.int32))

    # -- host tier -----------------------------------------------------------------------

    def admit(self, seq_id: int, max_tokens: int, offload: bool, whole_layers: int = 0,
              stream_prefill: bool = False, sink_pages: int = 0) -> SeqPages:
        """Start a sequence of at most ``max_tokens`` tokens; with ``offload`` its host tier
        is allocated up front (pages outside the resident set will live there), and so are
        the device pages of its first ``whole_layers`` layers, which never offload: one
        run each. ``stream_prefill``, ``sink_pages``: see :class:`SeqPages`."""
        assert seq_id not in self.tables, f"sequence {seq_id} admitted twice"
        table = self.tables[seq_id] = SeqPages(self.page_size, self.cfg.n_layers, offload, max_tokens,
                                               sink_pages=sink_pages, stream_prefill=stream_prefill)
        if offload:
            cfg, n_pages = self.cfg, -(-max_tokens // self.page_size)
            for ahead in table.ahead[:whole_layers]:
                ahead += self._allocate(n_pages)
            shape = (cfg.n_layers, 2, cfg.n_kv_heads, n_pages * self.page_size, cfg.head_dim)
            self.host[seq_id] = self.device.host_empty(shape, self.dtype)
        return table

    def host_tier(self, seq_id: int) -> Tensor:
        """The host tier [L, 2, Hkv, capacity, D] of ``seq_id``, for CPU readers: every copy
        into it issued so far has landed."""
        self.device.host_sync()
        return self.host[seq_id]

    def offload(self, seq_id: int, layer: int, page_idx: list[int]) -> Tensor | None:
        """Move full pages ``page_idx`` of one layer to the host tier and free their device
        pages. Returns their keys [Hkv, n, page_size, D] (a device copy, for a policy that
        keeps something of them on the device), or None if there were none."""
        if not page_idx:
            return None
        pages = self.tables[seq_id].layers[layer]
        assert all(pages[i] != OFFLOADED for i in page_idx), "offloading a page twice"
        src = self.device.tensor([pages[i] for i in page_idx], torch.int64)
        kv = self._pages(self.kv).index_select(1, src)  # [2 * Hkv, n, ps, D]
        self.device.to_host(self._pages(self.host[seq_id][layer]), kv, index=torch.tensor(page_idx))
        self.allocator.free([pages[i] for i in page_idx])
        for i in page_idx:
            pages[i] = OFFLOADED
        self._set_rows(seq_id, [(layer, i, OFFLOADED) for i in page_idx])
        return kv[: self.cfg.n_kv_heads]

    def fetch(self, seq_id: int, layer: int, page_idx: list[int], capacity: int) -> list[int]:
        """Device pages holding offloaded pages ``page_idx`` of one layer, through the
        sequence's LRU page cache of ``capacity`` pages for that layer (misses are copied
        from the host tier; hits and misses count pages of one KV head)."""
        assert len(page_idx) <= capacity, "more pages requested than the page cache holds"
        table = self.tables[seq_id]
        cache = table.cache[layer]
        wanted = set(page_idx)
        missing = [i for i in page_idx if i not in cache]
        self.hits.add((len(page_idx) - len(missing)) * self.cfg.n_kv_heads)
        self.misses.add(len(missing) * self.cfg.n_kv_heads)
        for i in page_idx:
            if i in cache:
                cache.move_to_end(i)
        n_evict = max(0, len(cache) + len(missing) - capacity)
        freed = [cache.pop(i) for i in [i for i in cache if i not in wanted][:n_evict]]
        reuse = freed[: len(missing)]
        self.allocator.free(freed[len(missing) :])  # the cache shrank to a smaller capacity
        pages = reuse + self._allocate(len(missing) - len(reuse))
        if missing:
            host = self._pages(self.host[seq_id][layer])
            self.device.to_device(self._pages(self.kv), self.device.host_gather(host, 1, torch.tensor(missing)),
                                  index=torch.tensor(pages))
            cache.update(zip(missing, pages))
        return [cache[i] for i in page_idx]

    def allocate(self, n: int) -> list[int]:
        """``n`` device pages for a policy's own state (freed with :meth:`free`); raises
        :class:`OutOfPages` past the budget."""
        return self._allocate(n)

    def free(self, pages: list[int]) -> None:
        self.allocator.free(pages)

    def copy_pages(self, index: Tensor) -> None:
        """Copy device pages ``index[1]`` onto device pages ``index[0]`` (int64 [2, n] on the
        device; all heads, K and V)."""
        pool = self._pages(self.kv)
        pool.index_copy_(1, index[0], pool.index_select(1, index[1]))

    def drop_cache(self, seq_id: int, layer: int) -> None:
        """Free the page cache of one layer of ``seq_id`` (the host tier keeps the KV)."""
        cache = self.tables[seq_id].cache[layer]
        self.allocator.free(list(cache.values()))
        cache.clear()

    def _allocate(self, n: int) -> list[int]:
        """``n`` device pages from the allocator; the pool grows to hold them if it must."""
        pages = self.allocator.allocate(n)
        if pages and max(pages) >= self.n_pool_pages:
            self._grow(max(pages) + 1)
        return pages

    @property
    def n_pool_pages(self) -> int:
        return self.kv.shape[2] // self.page_size

    def _grow(self, n_pages: int) -> None:
        """Reallocate the pool to hold at least ``n_pages`` pages (a quarter more, to grow
        rarely; at most the budget's), keeping what the pages in use hold."""
        n_pages = min(self.allocator.n_pages, max(n_pages, self.n_pool_pages * 5 // 4))
        old, used = self.kv, self.kv.shape[2]
        self._set_pool(self._new_pool(n_pages))
        self.kv[:, :, :used] = old

    def _new_pool(self, n_pages: int) -> Tensor:
        shape = (2, self.cfg.n_kv_heads, n_pages * self.page_size, self.cfg.head_dim)
        try:
            return self.device.empty(shape, self.dtype)
        except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError included
            raise ValueError(
                f"cannot allocate {format_size(n_pages * self.page_bytes)} of device memory for "
                f"the KV pool ({type(e).__name__}): lower device_kv_budget"
            ) from None

    def _set_pool(self, kv: Tensor) -> None:
        self.kv = kv
        self.k, self.v = kv.unbind(0)

    def _pages(self, t: Tensor) -> Tensor:
        """A ``[..., Hkv, n_slots, D]`` pool or host tier (contiguous) viewed as pages
        ``[H, n_pages, ps, D]``, ``H`` its heads (``2 * Hkv`` for K and V): whole pages are
        copied by page index (one run of ``ps * D`` per page and head)."""
        return t.view(-1, t.shape[-2] // self.page_size, self.page_size, t.shape[-1])

    # -- reporting -----------------------------------------------------------------------

    def memory_report(self) -> MemoryReport:
        t = self.device.traffic
        return MemoryReport(
            device_kv_budget=self.budget,
            device_kv_bytes=self.allocator.n_used * self.page_bytes,
            device_kv_bytes_peak=self.allocator.peak_used * self.page_bytes,
            device_pool_bytes=self.kv.numel() * self.kv.element_size(),
            host_kv_bytes=sum(h.numel() * h.element_size() for h in self.host.values()),
            h2d_bytes=t.h2d_bytes,
            d2h_bytes=t.d2h_bytes,
            cache_hits=self.hits.value,
            cache_misses=self.misses.value,
        )
