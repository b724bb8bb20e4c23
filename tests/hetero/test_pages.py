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
