"""The paged KV store: one device pool per layer under a byte budget, and a host tier.

The device pool has the layout the attention kernels read: ``[Hkv, n_slots, D]`` for K and
for V, ``n_slots = n_pages * page_size``, shared by all layers (each layer has its own pages). The host tier keeps a sequence's offloaded pages by
token position (``[L, Hkv, capacity, D]``), the layout CPU workers scan. Every copy between
the tiers goes through :class:`hetero.device.Device`, which counts the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.cache.pages import OFFLOADED, OutOfPages, PageAllocator, SeqPages
from hetero.config import ModelConfig
from hetero.device import Device, format_size


@dataclass(slots=True)
class MemoryReport:
    device_kv_budget: int
    device_kv_bytes: int
    device_kv_bytes_peak: int
    host_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int


class KVStore:
    """Device pool of KV pages under ``budget`` bytes, per-sequence page tables, host tier."""

    def __init__(
        self, cfg: ModelConfig, device: Device, dtype: torch.dtype, page_size: int, budget: int
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
        shape = (cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        # torch.empty reserves address space only; memory is committed as pages are written.
        self.k = device.empty(shape, dtype)
        self.v = device.empty(shape, dtype)
        self.tables: dict[int, SeqPages] = {}
        self.host: dict[int, tuple[Tensor, Tensor]] = {}

    # -- sequences -----------------------------------------------------------------------

    def reserve(self, seq_id: int, n_tokens: int) -> SeqPages:
        """Make room on the device for ``n_tokens`` tokens of ``seq_id`` in every layer."""
        table = self.tables.setdefault(seq_id, SeqPages(self.page_size, self.cfg.n_layers))
        need = table.pages_for(n_tokens)
        if need == 0:
            return table
        if need * self.cfg.n_layers > self.allocator.n_free:
            raise OutOfPages(
                f"the KV of {n_tokens} tokens needs "
                f"{format_size(need * self.cfg.n_layers * self.page_bytes)} more on the device, "
                f"but only {format_size(self.allocator.n_free * self.page_bytes)} of the "
                f"device_kv_budget {format_size(self.budget)} is free: raise device_kv_budget, "
                f"shorten the prompt or max_new_tokens, or send fewer prompts"
            )
        for pages in table.layers:  # one run per layer: the CPU path reads it as one view
            pages += self.allocator.allocate(need)
        return table

    def release(self, seq_id: int) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.allocator.free(table.on_device())
        self.host.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, n: int) -> Tensor:
        """Pool slots [L, n] (int64, device) of positions ``start..start+n-1`` per layer."""
        table = self.tables[seq_id]
        ps = self.page_size
        pos = torch.arange(start, start + n)
        pages = torch.tensor(table.layers)[:, pos // ps]
        assert bool((pages >= 0).all()), "writing to a page that is not on the device"
        return (pages * ps + pos % ps).to(self.device.device)

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one layer's ``k``, ``v`` [N, Hkv, D] at pool ``slots`` [N]."""
        self.k.index_copy_(1, slots, k.transpose(0, 1))
        self.v.index_copy_(1, slots, v.transpose(0, 1))

    def block_tables(self, seq_ids: list[int]) -> Tensor:
        """Page ids [L, B, max_pages] (int32, device) of each layer and sequence; -1 pads."""
        width = max(self.tables[s].n_pages for s in seq_ids)
        rows = [
            [pages + [OFFLOADED] * (width - len(pages)) for s in seq_ids for pages in [self.tables[s].layers[l]]]
            for l in range(self.cfg.n_layers)
        ]
        return torch.tensor(rows, dtype=torch.int32, device=self.device.device)

    # -- host tier -----------------------------------------------------------------------

    def offload(self, seq_id: int, layer: int, page_idx: list[int]) -> None:
        """Move pages ``page_idx`` of one layer of ``seq_id`` to the host tier."""
        table = self.tables[seq_id]
        hk, hv = self._host_buffers(seq_id, table.n_pages * self.page_size)
        pages = table.layers[layer]
        freed = []
        for i in page_idx:
            assert pages[i] != OFFLOADED, f"page {i} of sequence {seq_id} is not on the device"
            dev, host = self._page_slice(pages[i]), self._page_slice(i)
            self.device.to_host(hk[layer, :, host], self.k[:, dev])
            self.device.to_host(hv[layer, :, host], self.v[:, dev])
            freed.append(pages[i])
            pages[i] = OFFLOADED
        self.allocator.free(freed)

    def fetch(self, seq_id: int, layer: int, page_idx: list[int]) -> None:
        """Bring pages ``page_idx`` of one layer of ``seq_id`` back from the host tier."""
        pages = self.tables[seq_id].layers[layer]
        hk, hv = self.host[seq_id]
        for i, page in zip(page_idx, self.allocator.allocate(len(page_idx))):
            assert pages[i] == OFFLOADED, f"page {i} of sequence {seq_id} is already on the device"
            dev, host = self._page_slice(page), self._page_slice(i)
            self.device.to_device(self.k[:, dev], hk[layer, :, host])
            self.device.to_device(self.v[:, dev], hv[layer, :, host])
            pages[i] = page

    def _page_slice(self, page: int) -> slice:
        return slice(page * self.page_size, (page + 1) * self.page_size)

    def _host_buffers(self, seq_id: int, n_tokens: int) -> tuple[Tensor, Tensor]:
        """The host tier of ``seq_id`` [L, Hkv, capacity, D], grown (doubling) to ``n_tokens``."""
        cur = self.host.get(seq_id)
        if cur is not None and cur[0].shape[2] >= n_tokens:
            return cur
        cap = max(n_tokens, 2 * cur[0].shape[2] if cur else 0)
        cfg = self.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, cap, cfg.head_dim)
        new = self.device.host_empty(shape, self.dtype), self.device.host_empty(shape, self.dtype)
        if cur is not None:
            n = cur[0].shape[2]
            new[0][:, :, :n].copy_(cur[0])
            new[1][:, :, :n].copy_(cur[1])
        self.host[seq_id] = new
        return new

    # -- reporting -----------------------------------------------------------------------

    def memory_report(self) -> MemoryReport:
        t = self.device.traffic
        return MemoryReport(
            device_kv_budget=self.budget,
            device_kv_bytes=self.allocator.n_used * self.page_bytes,
            device_kv_bytes_peak=self.allocator.peak_used * self.page_bytes,
            host_kv_bytes=sum(k.numel() * k.element_size() * 2 for k, _ in self.host.values()),
            h2d_bytes=t.h2d_bytes,
            d2h_bytes=t.d2h_bytes,
        )
