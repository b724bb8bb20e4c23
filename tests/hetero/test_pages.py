import pytest

from hetero.cache import OFFLOADED, OutOfPages, PageAllocator, SeqPages


def test_allocate_prefers_contiguous_runs():
    a = PageAllocator(10)
    first = a.allocate(3)
    second = a.allocate(3)
    assert first == [0, 1, 2] and second == [3, 4, 5]
    a.free([1])  # a hole of one page must not split the next request of two
    assert a.allocate(2) == [6, 7]
    assert a.allocate(1) == [1]
    assert a.n_used == 8 and a.peak_used == 8


def test_allocate_falls_back_to_scattered_pages():
    a = PageAllocator(6)
    a.allocate(6)
    a.free([0, 2, 4])
    assert a.allocate(3) == [0, 2, 4]
    assert a.n_free == 0


def test_out_of_pages_is_a_value_error_and_changes_nothing():
    a = PageAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfPages, match="need 2 pages, 1 of 4 are free"):
        a.allocate(2)
    assert isinstance(OutOfPages("x"), ValueError)
    assert a.n_free == 1


def test_double_free_is_caught():
    a = PageAllocator(2)
    pages = a.allocate(1)
    a.free(pages)
    with pytest.raises(AssertionError):
        a.free(pages)


def test_seq_pages_growth_and_device_pages():
    t = SeqPages(page_size=4, n_layers=2)
    assert t.layers == [[], []] and t.n_pages == 0
    t.layers[0] += [7, 2]
    t.layers[1] += [OFFLOADED, 5]
    assert t.pages_for(8) == 0 and t.pages_for(9) == 1 and t.pages_for(17) == 3
    assert sorted(t.on_device()) == [2, 5, 7]


def test_allocator_needs_a_page():
    with pytest.raises(ValueError, match="at least one page"):
        PageAllocator(0)


class _ReferenceAllocator:
    """The allocator's rules on a plain set of free ids: first fit of a contiguous run in
    id order, else the lowest ids."""

    def __init__(self, n_pages):
        self.free_ids = set(range(n_pages))

    def allocate(self, n):
        free = sorted(self.free_ids)
        run_start = 0
        for i in range(len(free)):
            if i > run_start and free[i] != free[i - 1] + 1:
                run_start = i
            if i + 1 - run_start >= n:
                pages = free[run_start : run_start + n]
                break
        else:
            pages = free[:n]
        self.free_ids -= set(pages)
        return pages

    def free(self, pages):
        self.free_ids |= set(pages)


def test_allocator_matches_reference_on_random_traffic():
    import random

    rng = random.Random(0)
    n_pages = 300
    a, ref = PageAllocator(n_pages), _ReferenceAllocator(n_pages)
    held = []  # page lists handed out and not yet freed
    for step in range(4000):
        if held and rng.random() < 0.45:
            pages = held.pop(rng.randrange(len(held)))
            if len(pages) > 1 and rng.random() < 0.5:  # give back part of it, in any order
                rng.shuffle(pages)
                keep = rng.randrange(1, len(pages))
                held.append(pages[:keep])
                pages = pages[keep:]
            a.free(pages)
            ref.free(pages)
        else:
            n = rng.choice([0, 1, 1, 2, 3, 5, 8, 20, 60])
            if n > len(ref.free_ids):
                with pytest.raises(OutOfPages):
                    a.allocate(n)
                continue
            got = a.allocate(n)
            assert got == ref.allocate(n), f"step {step}"
            held.append(got)
        assert a.n_free == len(ref.free_ids) and a.n_used == n_pages - a.n_free
    assert a.peak_used <= n_pages


def test_freeing_and_allocating_scattered_pages_in_a_large_pool_is_fast():
    import time

    a = PageAllocator(300_000)
    a.allocate(300_000)
    scattered = list(range(0, 300_000, 60))[:5_000][::-1]
    t = time.perf_counter()
    a.free(scattered)
    assert a.n_free == 5_000
    assert a.allocate(5_000) == sorted(scattered)
    assert a.n_free == 0
    a.free(list(range(100_000, 105_234)))  # one long sequence's pages, as one run
    assert a.allocate(5_234) == list(range(100_000, 105_234))
    assert time.perf_counter() - t < 0.5


def test_freeing_a_page_that_is_not_allocated_is_caught():
    a = PageAllocator(8)
    a.allocate(4)
    with pytest.raises(AssertionError):
        a.free([5])  # never allocated
    with pytest.raises(AssertionError):
        a.free([1, 1])  # the same page twice in one call
    with pytest.raises(AssertionError):
        a.free([8])  # outside the pool
