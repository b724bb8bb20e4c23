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
    """Free device page ids ``0..n_pages-1``; first-fit contiguous allocation.

    The free set is kept as runs: ``_starts[i]`` and ``_lens[i]`` describe the free pages
    ``_starts[i] .. _starts[i] + _lens[i] - 1``, sorted by start, disjoint and never
    adjacent (neighbours merge when pages come back). A pool holds a few hundred thousand
    pages but only as many runs as the pool has holes, so a call costs a walk over the
    runs or a binary search per freed run, not a pass over every free page: a sorted list
    of page ids took a second to take back one long sequence's pages.
    """

    def __init__(self, n_pages: int):
        if n_pages < 1:
            raise ValueError(f"a device pool needs at least one page, got {n_pages}")
        self.n_pages = n_pages
        self._starts: list[int] = [0]
        self._lens: list[int] = [n_pages]
        self._n_free = n_pages
        self.peak_used = 0

    @property
    def n_free(self) -> int:
        return self._n_free

    @property
    def n_used(self) -> int:
        return self.n_pages - self._n_free

    def allocate(self, n: int) -> list[int]:
        """``n`` page ids: the first ``n`` of the lowest free run that holds them, else the
        ``n`` lowest free ids; raises :class:`OutOfPages`."""
        assert n >= 0, f"cannot allocate {n} pages"
        if n > self._n_free:
            raise OutOfPages(f"need {n} pages, {self._n_free} of {self.n_pages} are free")
        starts, lens = self._starts, self._lens
        i = next((i for i, length in enumerate(lens) if length >= n), None)
        if i is not None:
            pages = list(range(starts[i], starts[i] + n))
            if n == lens[i]:
                del starts[i], lens[i]
            else:
                starts[i], lens[i] = starts[i] + n, lens[i] - n
        else:  # no run long enough: whole runs from the bottom, then part of the next
            pages, k = [], 0
            while k < len(lens) and len(pages) + lens[k] <= n:
                pages += range(starts[k], starts[k] + lens[k])
                k += 1
            del starts[:k], lens[:k]  # at once: one by one would shift the list per run
            rest = n - len(pages)
            if rest:
                pages += range(starts[0], starts[0] + rest)
                starts[0], lens[0] = starts[0] + rest, lens[0] - rest
        self._n_free -= n
        self.peak_used = max(self.peak_used, self.n_used)
        return pages

    def free(self, pages: list[int]) -> None:
        """Return ``pages`` (any order) to the pool. A page that is not allocated (freed
        twice, or outside the pool) is a bug in the caller's tables: an assertion fails."""
        pages = sorted(pages)
        assert not pages or 0 <= pages[0] and pages[-1] < self.n_pages, "page outside the pool"
        run_start, n = 0, len(pages)
        for j in range(1, n + 1):  # one _give per run of consecutive pages
            if j == n or pages[j] != pages[j - 1] + 1:
                assert j == n or pages[j] != pages[j - 1], f"page {pages[j]} freed twice"
                self._give(pages[run_start], pages[j - 1] + 1)
                run_start = j

    def _give(self, a: int, b: int) -> None:
        """Add the free pages ``a .. b-1`` as a run, merged with the runs it touches."""
        starts, lens = self._starts, self._lens
        i = bisect.bisect_right(starts, a)  # runs before i start at or below a
        end_before = starts[i - 1] + lens[i - 1] if i else -1
        assert end_before <= a, f"page {a} freed twice"
        assert i == len(starts) or b <= starts[i], f"page {starts[i]} freed twice"
        if end_before == a:  # extends the run before; maybe closes the gap to the next
            lens[i - 1] += b - a
            if i < len(starts) and starts[i] == b:
                lens[i - 1] += lens[i]
                del starts[i], lens[i]
        elif i < len(starts) and starts[i] == b:  # extends the next run downwards
            starts[i], lens[i] = a, lens[i] + b - a
        else:
            starts.insert(i, a)
            lens.insert(i, b - a)
        self._n_free += b - a


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
