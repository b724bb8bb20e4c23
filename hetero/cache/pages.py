"""Page bookkeeping, without tensors: which device pages a sequence owns, and the budget.

A page is ``page_size`` consecutive tokens of one layer's K and V (all KV heads). Every
layer draws its pages from one pool, so layers may keep different amounts of KV on the
device (dense layers all of it, sparse layers sinks, window and a page cache). The
allocator hands out contiguous runs when it can: the CPU attention path reads a run as one
view.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

OFFLOADED = -1
"""Page-table entry of a page that lives on the host tier only."""


class OutOfPages(ValueError):
    """The device budget cannot hold the requested pages."""


class PageAllocator:
    """Free list of device page ids ``0..n_pages-1``; first-fit contiguous allocation."""

    def __init__(self, n_pages: int):
        if n_pages < 1:
            raise ValueError(f"a device pool needs at least one page, got {n_pages}")
        self.n_pages = n_pages
        self._free: list[int] = list(range(n_pages))  # kept sorted
        self.peak_used = 0

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` page ids, contiguous if such a run is free; raises :class:`OutOfPages`."""
        assert n >= 0, f"cannot allocate {n} pages"
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.n_pages} are free")
        free = self._free
        run_start = 0
        for i in range(1, len(free) + 1):  # stops at the first run long enough
            if i - run_start >= n:
                pages = free[run_start : run_start + n]
                del free[run_start : run_start + n]
                break
            if i < len(free) and free[i] != free[i - 1] + 1:
                run_start = i
        else:  # no run long enough: take the lowest ids
            pages = free[:n]
            del free[:n]
        self.peak_used = max(self.peak_used, self.n_used)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            i = bisect.bisect_left(self._free, p)
            assert i == len(self._free) or self._free[i] != p, f"page {p} freed twice"
            self._free.insert(i, p)


@dataclass(slots=True)
class SeqPages:
    """Page tables of one sequence: ``layers[l][i]`` is the device page holding tokens
    ``i*page_size ..`` of layer ``l``, or :data:`OFFLOADED`. ``n_tokens`` are written.

    With ``offload``, pages outside the resident set go to the host tier; the device keeps
    fetched copies for exact attention in the per-layer LRU ``cache[l]`` (page index ->
    device page); what a policy keeps of its own (quest's key bounds and head cache) it
    holds itself. ``ahead[l]`` are device pages set aside for the layer's later
    tokens: a layer that never offloads gets its whole run at admission, so that attention
    reads it as one view however the other layers' pages interleave.

    An offloading sequence is prefilled layer by layer, and ``layers[l]`` grows one layer at
    a time then (layer 0 leads). With ``stream_prefill`` one layer's whole KV does not fit
    the budget: the layer's pages leave for the host tier chunk by chunk and later chunks
    stream them back.
    """

    page_size: int
    n_layers: int
    offload: bool = False
    capacity: int = 0  # most tokens the sequence may reach
    layers: list[list[int]] = field(default_factory=list)
    cache: list[OrderedDict] = field(default_factory=list)
    ahead: list[list[int]] = field(default_factory=list)
    n_tokens: int = 0
    settled: int = 0  # pages before this one are offloaded or stay for good (sinks)
    sink_pages: int = 0  # leading pages that stay for good (the policy's, set at admission)
    stream_prefill: bool = False

    def __post_init__(self):
        if not self.layers:
            self.layers = [[] for _ in range(self.n_layers)]
            self.cache = [OrderedDict() for _ in range(self.n_layers)]
            self.ahead = [[] for _ in range(self.n_layers)]

    @property
    def n_pages(self) -> int:
        return len(self.layers[0])  # the most of any layer: layer 0 leads a layer-wise prefill

    @property
    def offloaded(self) -> range:
        """The pages of every offloading layer that live on the host tier: one run,
        ``[sink_pages, settled)``, which the engine advances as tokens leave the window
        (empty for a sequence that does not offload). The one statement of this rule."""
        if not self.offload:
            return range(0)
        return range(self.sink_pages, max(self.sink_pages, self.settled))

    def offloads_layer(self, layer: int) -> bool:
        """Whether ``layer`` has pages on the host tier (the offloaded run; dense layers and
        sequences that keep their KV have none)."""
        run = self.offloaded
        return bool(run) and self.layers[layer][run.start] == OFFLOADED

    def pages_for(self, n_tokens: int) -> int:
        """How many more pages per layer are needed to hold ``n_tokens`` tokens in all."""
        return max(0, -(-n_tokens // self.page_size) - self.n_pages)

    def on_device(self) -> list[int]:
        """Every device page the sequence's tables hold: KV and cached copies."""
        kv = [p for pages in self.layers + self.ahead for p in pages if p != OFFLOADED]
        return kv + [p for c in self.cache for p in c.values()]
