"""The paged KV store: one device pool per layer under a byte budget, and a host tier.

Device pools have the layout the attention kernels read: per layer ``[Hkv, n_slots, D]``
with ``n_slots = n_pages * page_size``. The host tier keeps a sequence's offloaded pages by
token position (``[L, Hkv, capacity, D]``), the layout CPU workers scan. Every copy between
the tiers goes through :class:`hetero.device.Device`, which counts the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.cache.pages import OutOfPages, PageAllocator, PageTable
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
    def __init__(
        self, cfg: ModelConfig, device: Device, dtype: torch.dtype, page_size: int, budget: int
    ):
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.cfg, self.device, self.dtype, self.page_size = cfg, device, dtype, page_size
        self.page_bytes = cfg.kv_bytes_per_token(dtype.itemsize) * page_size
        n_pages = budget // self.page_bytes
        if n_pages < 1:
            raise ValueError(
                f"device_kv_budget {format_size(budget)} is below one page of KV "
                f"({format_size(self.page_bytes)} for page_size={page_size}): raise the budget"
            )
        self.budget = budget
        self.allocator = PageAllocator(n_pages)
        shape = (cfg.n_layers, cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        # torch.empty reserves address space only; memory is committed as pages are written.
        self.k = device.empty(shape, dtype)
        self.v = device.empty(shape, dtype)
        self.tables: dict[int, PageTable] = {}
        self.host: dict[int, tuple[Tensor, Tensor]] = {}

    # -- sequences -----------------------------------------------------------------------

    def reserve(self, seq_id: int, n_tokens: int) -> PageTable:
        """Make room on the device for ``n_tokens`` tokens of ``seq_id`` (all layers)."""
        table = self.tables.setdefault(seq_id, PageTable(self.page_size))
        need = table.pages_for(n_tokens)
        if need == 0:
            return table
        nxt = self.allocator.allocate_after(table.pages[-1]) if table.pages and need == 1 else None
        try:
            table.pages += [nxt] if nxt is not None else self.allocator.allocate(need)
        except OutOfPages:
            raise OutOfPages(
                f"the KV of {n_tokens} tokens needs {format_size(need * self.page_bytes)} more "
                f"on the device, but only {format_size(self.allocator.n_free * self.page_bytes)} "
                f"of the device_kv_budget {format_size(self.budget)} is free: raise "
                f"device_kv_budget, shorten the prompt or max_new_tokens, or send fewer prompts"
            ) from None
        return table

    def release(self, seq_id: int) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.allocator.free([p for p in table.pages if p >= 0])
        self.host.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, n: int) -> Tensor:
        """Pool slots [n] (int64, on the device) of positions ``start..start+n-1``."""
        table = self.tables[seq_id]
        return torch.tensor(
            [table.slot(p) for p in range(start, start + n)], device=self.device.device
        )

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store ``k``, ``v`` [N, Hkv, D] of one layer at pool ``slots`` [N]."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1))

    def block_table(self, seq_ids: list[int]) -> Tensor:
        """Page ids [B, max_pages] (int32, device) of each sequence; -1 pads."""
        width = max(len(self.tables[s].pages) for s in seq_ids)
        rows = [self.tables[s].pages + [-1] * (width - len(self.tables[s].pages)) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.device.device)

    # -- host tier -----------------------------------------------------------------------

    def offload(self, seq_id: int, page_idx: list[int]) -> None:
        """Move logical pages ``page_idx`` of ``seq_id`` to the host tier, freeing device pages."""
        table = self.tables[seq_id]
        hk, hv = self._host_buffers(seq_id, len(table.pages) * self.page_size)
        freed = []
        for i in page_idx:
            page = table.pages[i]
            assert page >= 0, f"page {i} of sequence {seq_id} is not on the device"
            dev, host = self._page_slice(page), slice(i * self.page_size, (i + 1) * self.page_size)
            self.device.to_host(hk[:, :, host], self.k[:, :, dev])
            self.device.to_host(hv[:, :, host], self.v[:, :, dev])
            table.pages[i] = -1
            freed.append(page)
        self.allocator.free(freed)

    def fetch(self, seq_id: int, page_idx: list[int]) -> None:
        """Bring logical pages ``page_idx`` of ``seq_id`` back from the host tier."""
        table = self.tables[seq_id]
        hk, hv = self.host[seq_id]
        pages = self.allocator.allocate(len(page_idx))
        for i, page in zip(page_idx, pages):
            assert table.pages[i] == -1, f"page {i} of sequence {seq_id} is already on the device"
            dev, host = self._page_slice(page), slice(i * self.page_size, (i + 1) * self.page_size)
            self.device.to_device(self.k[:, :, dev], hk[:, :, host])
            self.device.to_device(self.v[:, :, dev], hv[:, :, host])
            table.pages[i] = page

    def _page_slice(self, page: int) -> slice:
        return slice(page * self.page_size, (page + 1) * self.page_size)

    def _host_buffers(self, seq_id: int, n_tokens: int) -> tuple[Tensor, Tensor]:
        """The host tier of ``seq_id``, grown (doubling) to hold ``n_tokens`` positions."""
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
