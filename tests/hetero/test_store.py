import pytest
import torch

from hetero.cache import KVStore, OutOfPages
from hetero.config import ModelConfig
from hetero.device import Device, parse_size

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=4)
PAGE_BYTES = 2 * 2 * 4 * 4 * 4  # K+V, kv heads, page_size, head_dim, fp32 (one layer)


def _store(pages=8, page_size=4):
    return KVStore(CFG, Device(torch.device("cpu")), torch.float32, page_size, pages * PAGE_BYTES)


def _fill(store, seq, n, offload=True):
    store.admit(seq, n, offload)
    store.reserve(seq, n)
    slots = store.slots(seq, 0, n)
    for layer in range(CFG.n_layers):
        k = torch.randn(n, 2, 4)
        store.write(slots[layer], k, k + 100)
    store.tables[seq].n_tokens = n


def _kv(store, seq):
    """K of every layer [L, Hkv, n, D] by position, read from the device pages."""
    table, ps = store.tables[seq], store.page_size
    slots = torch.tensor([[p * ps + i for p in pages for i in range(ps)] for pages in table.layers])
    return torch.stack([store.k[:, s] for s in slots])


def test_offload_moves_pages_to_the_host_and_fetch_goes_through_an_lru_cache():
    store = _store(pages=16)
    _fill(store, 0, 16)  # 4 full pages per layer
    kv = _kv(store, 0)
    k = store.offload(0, 1, [1, 2])
    table = store.tables[0]
    assert table.layers[1][1:3] == [-1, -1] and -1 not in table.layers[0]
    assert torch.equal(k, kv[1].view(2, 4, 4, 4)[:, 1:3])  # their keys, for a policy to keep
    rep = store.memory_report()
    assert rep.d2h_bytes == 2 * PAGE_BYTES and rep.h2d_bytes == 0
    assert rep.host_kv_bytes == 2 * CFG.n_layers * 2 * 16 * 4 * 4  # K, V for 16 tokens
    assert store.allocator.n_used == 8 - 2
    assert torch.equal(store.host[0][1, 0, :, 4:12], kv[1, :, 4:12])

    dev = store.fetch(0, 1, [2, 1], capacity=2)  # two misses
    assert torch.equal(store.k[:, dev[0] * 4 : dev[0] * 4 + 4], kv[1, :, 8:12])
    assert torch.equal(store.v[:, dev[1] * 4 : dev[1] * 4 + 4], kv[1, :, 4:8] + 100)
    assert store.memory_report().h2d_bytes == 2 * PAGE_BYTES
    assert store.fetch(0, 1, [1], capacity=2) == [dev[1]]  # a hit moves nothing
    assert (store.hits.value, store.misses.value) == (1 * 2, 2 * 2)  # pages of one KV head
    assert store.memory_report().h2d_bytes == 2 * PAGE_BYTES
    store.release(0)
    assert store.allocator.n_used == 0


def test_fetch_evicts_the_least_recently_used_page():
    store = _store(pages=16)
    _fill(store, 0, 16)
    store.offload(0, 0, [0, 1, 2])
    a, b = store.fetch(0, 0, [0, 1], capacity=2)
    store.fetch(0, 0, [0], capacity=2)  # page 1 is now the least recently used
    (c,) = store.fetch(0, 0, [2], capacity=2)
    assert c == b and list(store.tables[0].cache[0]) == [0, 2]


def test_slots_follow_each_layers_pages():
    store = _store()
    store.reserve(0, 6)  # 2 pages per layer: layer 0 -> [0, 1], layer 1 -> [2, 3]
    assert store.slots(0, 3, 3).tolist() == [[3, 4, 5], [11, 12, 13]]
    assert store.block_tables([0]).tolist() == [[[0, 1]], [[2, 3]]]


def test_budget_is_never_exceeded_and_release_frees():
    store = _store(pages=8)
    store.reserve(0, 10)  # 3 pages per layer
    with pytest.raises(OutOfPages, match="device_kv_budget"):
        store.reserve(1, 8)  # 2 more pages per layer, only 2 free
    assert store.allocator.n_used == 6
    store.release(0)
    store.release(1)
    assert store.allocator.n_used == 0
    assert store.memory_report().device_kv_bytes_peak == 6 * PAGE_BYTES


def test_each_layer_gets_one_run():
    store = _store(pages=8)
    store.reserve(0, 16)
    assert store.tables[0].layers == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_whole_layers_of_an_offloading_sequence_are_one_run_however_pages_interleave():
    store = _store(pages=16)
    store.admit(0, 16, offload=True, whole_layers=1)  # layer 0 takes pages 0..3 now
    for n in (4, 8, 12, 16):  # chunk by chunk, as prefill reserves
        store.reserve(0, n)
    table = store.tables[0]
    assert table.layers == [[0, 1, 2, 3], [4, 5, 6, 7]] and table.ahead == [[], []]
    store.release(0)
    store.admit(1, 16, offload=True, whole_layers=1)
    store.reserve(1, 4)
    assert store.allocator.n_used == 4 + 1  # layer 0's pages are all set aside already
    store.release(1)
    assert store.allocator.n_used == 0


def test_bad_page_size_and_tiny_budget():
    with pytest.raises(ValueError, match="power of two"):
        _store(page_size=6)
    with pytest.raises(ValueError, match="below one page per layer"):
        KVStore(CFG, Device(torch.device("cpu")), torch.float32, 4, 2 * PAGE_BYTES - 1)


@pytest.mark.parametrize("text, n", [("64MiB", 64 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
                                     ("4096", 4096), (123, 123)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "12 parsecs", "-1", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_fetch_with_a_smaller_capacity_shrinks_the_cache():
    store = _store(pages=32)
    _fill(store, 0, 32)  # 8 pages per layer
    store.offload(0, 0, [1, 2, 3, 4, 5])
    store.fetch(0, 0, [1, 2, 3, 4], capacity=4)
    used = store.allocator.n_used
    store.fetch(0, 0, [5], capacity=2)
    assert list(store.tables[0].cache[0]) == [4, 5]  # the most recent, within capacity
    assert store.allocator.n_used == used - 2


def test_the_device_page_tables_follow_reserve_offload_and_growth():
    store = _store(pages=32)
    store.admit(0, 24, offload=True)
    for n in (3, 8, 13, 20):  # pages appear one layer-wide reservation at a time
        store.reserve(0, n)
        if n == 13:
            store.offload(0, 1, [1, 2])
        want = [pages + [-1] * (6 - len(pages)) for pages in store.tables[0].layers]
        assert store.block_tables([0], 6)[:, 0].tolist() == want
    assert store.block_tables([0])[1, 0, 1:3].tolist() == [-1, -1]  # offloaded pages read -1
    store.reserve(1, 4)  # admitted for 4 tokens (1 page), then it grows past that
    store.reserve(1, 12)
    both = store.block_tables([0, 1])  # [L, B, widest]: the shorter sequence padded
    assert both.shape == (2, 2, 5) and both[:, 1, :3].tolist() == store.tables[1].layers
    assert both[:, 1, 3:].eq(-1).all()
    store.release(0)
    assert 0 not in store._rows
