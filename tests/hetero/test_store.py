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


def _fill(store, seq, n):
    store.reserve(seq, n)
    slots = store.slots(seq, 0, n)
    for layer in range(CFG.n_layers):
        k = torch.randn(n, 2, 4)
        store.write(slots[layer], k, k + 100)
    store.tables[seq].n_tokens = n


def _read(store, seq, n):
    """K of every layer [L, n, Hkv, D] by position, from wherever each page lives."""
    table, ps = store.tables[seq], store.page_size
    out = torch.empty(CFG.n_layers, n, 2, 4)
    for layer in range(CFG.n_layers):
        for pos in range(n):
            page = table.layers[layer][pos // ps]
            if page >= 0:
                out[layer, pos] = store.k[:, page * ps + pos % ps]
            else:
                out[layer, pos] = store.host[seq][0][layer, :, pos]
    return out


def test_offload_and_fetch_round_trip_and_count_bytes():
    store = _store()
    _fill(store, 0, 14)  # 4 pages per layer, the last one partial
    before = _read(store, 0, 14)
    store.offload(0, 1, [1, 2])
    assert store.tables[0].layers[1] == [4, -1, -1, 7] and store.tables[0].layers[0] == [0, 1, 2, 3]
    assert store.allocator.n_used == 6
    rep = store.memory_report()
    assert rep.d2h_bytes == 2 * PAGE_BYTES and rep.h2d_bytes == 0
    assert rep.host_kv_bytes >= 2 * PAGE_BYTES
    assert torch.equal(_read(store, 0, 14), before)
    store.fetch(0, 1, [2, 1])
    assert all(p >= 0 for p in store.tables[0].layers[1])
    assert store.memory_report().h2d_bytes == 2 * PAGE_BYTES
    assert torch.equal(_read(store, 0, 14), before)
    # V went along with K
    page = store.tables[0].layers[1][1]
    assert torch.equal(store.v[:, page * 4], store.k[:, page * 4] + 100)


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
