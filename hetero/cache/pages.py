"""Page bookkeeping, without tensors: which device pages a sequence owns, and the budget.

A page is ``page_size`` consecutive tokens of K and V. A device page id names the same slot
range in every layer's pool, so one table per sequence serves all layers. The allocator
hands out contiguous runs when it can: the CPU attention path reads a run as one view.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


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
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.n_pages} are free")
        free = self._free
        run_start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:
                if i - run_start >= n:
                    pages = free[run_start : run_start + n]
                    del free[run_start : run_start + n]
                    break
                run_start = i
        else:  # no run long enough: take the lowest ids
            pages = free[:n]
            del free[:n]
        self.peak_used = max(self.peak_used, self.n_used)
        return pages

    def allocate_after(self, page: int) -> int | None:
        """The id right after ``page`` if it is free (keeps a sequence contiguous), else None."""
        i = bisect.bisect_left(self._free, page + 1)
        if i < len(self._free) and self._free[i] == page + 1:
            del self._free[i]
            self.peak_used = max(self.peak_used, self.n_used)
            return page + 1
        return None

    def free(self, pages: list[int]) -> None:
        for p in pages:
            i = bisect.bisect_left(self._free, p)
            assert i == len(self._free) or self._free[i] != p, f"page {p} freed twice"
            self._free.insert(i, p)


@dataclass(slots=True)
class PageTable:
    """The device pages of one sequence, in token order; ``n_tokens`` of them are written."""

    page_size: int
    pages: list[int] = field(default_factory=list)
    n_tokens: int = 0

    def pages_for(self, n_tokens: int) -> int:
        """How many more pages are needed to hold ``n_tokens`` tokens in all."""
        return max(0, -(-n_tokens // self.page_size) - len(self.pages))

    def slot(self, position: int) -> int:
        """Pool slot of the token at ``position``."""
        return self.pages[position // self.page_size] * self.page_size + position % self.page_size
