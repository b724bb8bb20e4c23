"""What a decode-attention policy decides, and the per-step metadata it reads.

A policy says which pages of a sequence stay on the device when the sequence offloads
(sinks, local window, and for its ``dense_layers`` everything), how many fetched pages its
page cache holds per layer, and computes decode attention for one layer of a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from gpu_kernels import PagedTables
from hetero.backend import CPUBackend
from hetero.cache import OFFLOADED, KVStore, SeqPages
from hetero.config import ModelConfig


@dataclass(slots=True)
class DecodeStep:
    """Per-step metadata shared by every layer of one decode step (built once per step).

    ``n_tokens`` (host) and ``kv_lens`` [B, Hkv] int32 (device): tokens of each sequence,
    the new token included.
    """

    store: KVStore
    seq_ids: list[int]
    n_tokens: list[int]
    kv_lens: Tensor
    scale: float
    _tables: Tensor | None = None

    def host_tables(self, layer: int) -> PagedTables:
        """The host copy of ``block_tables[layer]`` and ``kv_lens``."""
        hkv = self.kv_lens.shape[1]
        return PagedTables([[self.store.tables[s].layers[layer]] for s in self.seq_ids],
                           [[n] * hkv for n in self.n_tokens])

    @property
    def block_tables(self) -> Tensor:
        """[L, B, Hkv, P] int32 device pages of every layer (-1: offloaded or padding),
        built on first use."""
        if self._tables is None:
            b, hkv = self.kv_lens.shape
            self._tables = self.store.block_tables(self.seq_ids)[:, :, None, :].expand(-1, b, hkv, -1)
        return self._tables


@dataclass(slots=True)
class Policy(ABC):
    """Base of every policy: the resident set is ``n_sink`` first and ``n_local`` last
    tokens (page-aligned), plus every page of the first ``dense_layers`` layers; exact
    attention streams offloaded pages through the page cache ``stream_pages`` at a time."""

    name: ClassVar[str]
    n_sink: int = 4
    n_local: int = 64
    dense_layers: int = 0
    stream_pages: int = 64

    def __post_init__(self):
        for field in ("n_sink", "n_local", "dense_layers", "stream_pages"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{self.name}: {field} must be an integer >= 0, got {value!r}")
        if self.n_local < 1:
            raise ValueError(f"{self.name}: n_local must be >= 1 (the new token's page is local)")
        if self.stream_pages < 1:
            raise ValueError(f"{self.name}: stream_pages must be >= 1")

    # -- tiering -------------------------------------------------------------------------

    def offloads(self, fits: bool, n_tokens: int, page_size: int) -> bool:
        """Whether a sequence of up to ``n_tokens`` keeps only its resident set on the device;
        ``fits`` tells whether its whole KV fits the free device budget."""
        return True

    def cache_pages(self, cfg: ModelConfig, page_size: int) -> int:
        """Pages of fetched (offloaded) KV a layer's page cache keeps between decode steps."""
        return 0

    def offload_pages(self, n_pages: int, page_size: int) -> int:
        """Device pages a layer keeps for its offloaded pages (``on_offload``) when a
        sequence has ``n_pages`` per layer: none unless the policy keeps something of them."""
        return 0

    def sink_pages(self, page_size: int) -> int:
        """Leading pages that hold the attention sinks."""
        return -(-self.n_sink // page_size)

    def first_local(self, n_tokens: int, page_size: int) -> int:
        """First page of the local window; pages between the sinks and it are offloaded."""
        return max(self.sink_pages(page_size), (n_tokens - self.n_local) // page_size)

    def resident(self, layer: int, n_tokens: int, page_size: int) -> list[int]:
        """Page indices of one layer that stay on the device for a sequence of ``n_tokens``,
        in token order."""
        n_pages = -(-n_tokens // page_size)
        if layer < self.dense_layers:
            return list(range(n_pages))
        n_sink = min(n_pages, self.sink_pages(page_size))
        return [*range(n_sink), *range(self.first_local(n_tokens, page_size), n_pages)]

    def device_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                     stream_prefill: bool = False) -> int:
        """Most device pages one offloading sequence of ``n_tokens`` holds at any time: while
        it is prefilled (:meth:`prefill_pages`) or decodes (:meth:`steady_pages`)."""
        return max(self.steady_pages(cfg, n_tokens, page_size),
                   self.prefill_pages(cfg, n_tokens, page_size, chunk, stream_prefill))

    def steady_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int) -> int:
        """Device pages one offloading sequence of ``n_tokens`` holds while it decodes: the
        dense layers whole, and the resident set, page cache and key metadata of every
        other layer."""
        n_pages = -(-n_tokens // page_size)
        n_dense = min(self.dense_layers, cfg.n_layers)
        cached = min(self._layer_share(n_pages, page_size) + self.cache_pages(cfg, page_size), n_pages + 1)
        return n_dense * n_pages + (cfg.n_layers - n_dense) * cached

    def prefill_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                      stream_prefill: bool = False) -> int:
        """Most device pages an offloading sequence holds while it is prefilled, layer by
        layer: the dense layers whole, the layers done their resident set and metadata, and
        the layer at hand its whole KV, or with ``stream_prefill`` its resident set, a chunk
        and ``stream_pages`` of its prior KV streamed back."""
        n_pages = -(-n_tokens // page_size)
        n_dense = min(self.dense_layers, cfg.n_layers)
        if n_dense == cfg.n_layers:
            return n_dense * n_pages
        share = min(self._layer_share(n_pages, page_size), n_pages + 1)
        if stream_prefill:
            at_hand = share + chunk // page_size + 1 + self.stream_pages
        else:
            at_hand = n_pages + self.offload_pages(n_pages, page_size)
        return n_dense * n_pages + (cfg.n_layers - n_dense - 1) * share + at_hand

    def _layer_share(self, n_pages: int, page_size: int) -> int:
        """Device pages an offloaded layer keeps: sinks, the window (and the page that
        leaves it, and a partial one), what the policy keeps of its offloaded pages."""
        return self.sink_pages(page_size) + self.n_local // page_size + 2 + self.offload_pages(n_pages, page_size)

    # -- lifecycle hooks (no-ops unless a policy keeps state outside the store) ---------

    def bind(self, backend: CPUBackend, store: KVStore) -> None:
        """Called once by the facade with the execution backend (CPU workers) and the store."""

    def on_offload(self, store: KVStore, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        """Called by the engine as pages ``page_idx`` of one layer leave for the host tier,
        with their keys ``k`` [Hkv, n, page_size, D] (a device copy; the pages are free)."""

    def on_prefill_layer_done(self, store: KVStore, seq_id: int, layer: int, settled: int) -> None:
        """Called by the engine as each layer finishes a prompt's last chunk, before the next
        layer runs: the layer's KV is written and, in sparse layers of an offloading
        sequence, its pages before ``settled`` are on the host tier."""

    def on_release(self, seq_id: int) -> None:
        """Called by the engine before a sequence's KV is freed."""

    # -- attention -----------------------------------------------------------------------

    @abstractmethod
    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        """Attention output [B, Hq, D] for queries ``q`` [B, Hq, D] of one layer."""

    def resident_pages(self, table: SeqPages, layer: int) -> list[int]:
        """Device pages holding the tokens of one layer, in token order: the resident set,
        and pages that left the window during this step (the engine offloads them after
        it), so that with the offloaded run (``SeqPages.offloaded``) they cover every
        token."""
        pages = table.layers[layer][: -(-table.n_tokens // table.page_size)]
        run = table.offloaded
        if run and pages[run.start] == OFFLOADED:  # a layer that offloads (not a dense one)
            pages = pages[: run.start] + pages[run.stop :]
        return pages


def pack_tables(
    rows: list[list[int]], n_tokens: list[int], page_size: int, hkv: int, device: torch.device
) -> tuple[Tensor, Tensor, PagedTables]:
    """Block tables [B, Hkv, P] (int32, -1 pads) and kv_lens [B, Hkv] from per-sequence page
    lists shared by every KV head, whose last page is the sequence's last (partial) page,
    and their host copy for the CPU path. A single row stays a stride-0 view over heads."""
    lens = []
    for r, n in zip(rows, n_tokens):
        last = n - (n - 1) // page_size * page_size  # tokens in the last page
        lens.append((len(r) - 1) * page_size + last)
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
    host = PagedTables([[r] for r in rows], [[n] * hkv for n in lens])
    lens_t = torch.tensor(lens, dtype=torch.int32)[:, None].expand(-1, hkv)
    return table[:, None, :].expand(-1, hkv, -1).to(device), lens_t.to(device), host
