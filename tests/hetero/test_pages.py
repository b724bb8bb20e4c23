import pytest

from hetero.cache import OutOfPages, PageAllocator, PageTable


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


def test_allocate_after_extends_a_run_only_when_free():
    a = PageAllocator(4)
    assert a.allocate(1) == [0]
    assert a.allocate_after(0) == 1
    a.allocate(1)  # takes 2
    assert a.allocate_after(1) is None
    assert a.peak_used == 3


def test_double_free_is_caught():
    a = PageAllocator(2)
    pages = a.allocate(1)
    a.free(pages)
    with pytest.raises(AssertionError):
        a.free(pages)


def test_page_table_slots_and_growth():
    t = PageTable(page_size=4, pages=[7, 2])
    assert [t.slot(p) for p in (0, 3, 4, 7)] == [28, 31, 8, 11]
    assert t.pages_for(8) == 0 and t.pages_for(9) == 1 and t.pages_for(17) == 3


def test_allocator_needs_a_page():
    with pytest.raises(ValueError, match="at least one page"):
        PageAllocator(0)
