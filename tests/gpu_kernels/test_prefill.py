"""prefill_attention and prior_attention: CPU path and Triton kernel (interpreter) against
the float64 oracle, the kernel under every allowed tile shape, tile selection."""

import pytest
import torch

from gpu_kernels import _paged, prefill_attention, prior_attention
from gpu_kernels import prefill as prefill_mod
from gpu_kernels.prefill import (
    PREFILL_TILE_SHAPES, PrefillTiles, _prefill_torch, _prefill_triton, prefill_tiles,
)
from tests.oracle import attention_oracle

ATOL = RTOL = 1e-4  # fp32 results vs the float64 oracle
D, PS, N_PAGES = 16, 4, 12
TEST_TILES = PrefillTiles(16, 16)  # the interpreter's tl.dot is exact in fp32 at any tile


def _cache(hkv, seed=0, d=D, n_slots=N_PAGES * PS):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hkv, n_slots, d, generator=g), torch.randn(hkv, n_slots, d, generator=g)


@pytest.fixture(autouse=True)
def _cpu_variant(request, monkeypatch):
    """``cpu``: short prior runs are gathered on these tiny shapes; ``cpu-views``: every run a view."""
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("impl") == "cpu-views":
        monkeypatch.setattr(_paged, "MIN_VIEW_TOKENS", 1)


def _run(impl, *args, tiles=TEST_TILES):
    if impl.startswith("cpu"):
        return prefill_attention(*args)
    return _prefill_triton(*args, tiles=tiles)


def _run_prior(impl, *args, tiles=TEST_TILES):
    if impl.startswith("cpu"):
        return prior_attention(*args)
    return _prefill_triton(*args, causal=False, tiles=tiles)


def _assert_oracle(out, lse, q, k_cache, v_cache, block_table, n_keys, q_pos, scale, page_size):
    """``out, lse`` match the oracle of ``q`` at ``q_pos`` over the first ``n_keys`` table keys."""
    t = torch.arange(n_keys)
    slots = block_table[t // page_size].long() * page_size + t % page_size
    k, v = k_cache[:, slots].transpose(0, 1), v_cache[:, slots].transpose(0, 1)
    ref_out, ref_lse = attention_oracle(q, k, v, q_pos, t, scale)
    c, hq, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (c, hq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)


def _check(impl, hq, hkv, pages, start, c, scale=0.3, seed=0, d=D, page_size=PS, tiles=TEST_TILES):
    k_cache, v_cache = _cache(hkv, seed, d, n_slots=max(N_PAGES, max(pages) + 1) * page_size)
    block_table = torch.tensor(pages, dtype=torch.int32)
    q = torch.randn(c, hq, d, generator=torch.Generator().manual_seed(seed + 1))
    out, lse = _run(impl, q, k_cache, v_cache, block_table, start, scale, page_size, tiles=tiles)
    _assert_oracle(out, lse, q, k_cache, v_cache, block_table, start + c, start + torch.arange(c),
                   scale, page_size)


def _check_prior(impl, hq, hkv, pages, n_keys, c, scale=0.3, seed=0, d=D, page_size=PS, tiles=TEST_TILES):
    k_cache, v_cache = _cache(hkv, seed, d, n_slots=max(N_PAGES, max(pages) + 1) * page_size)
    block_table = torch.tensor(pages, dtype=torch.int32)
    q = torch.randn(c, hq, d, generator=torch.Generator().manual_seed(seed + 1))
    out, lse = _run_prior(impl, q, k_cache, v_cache, block_table, n_keys, scale, page_size, tiles=tiles)
    # Every query sits after every key: the oracle's causal rule then masks nothing.
    _assert_oracle(out, lse, q, k_cache, v_cache, block_table, n_keys, torch.full((c,), n_keys),
                   scale, page_size)


IMPLS = ["cpu", "cpu-views", "triton"]
HEADS = [(4, 2), (2, 2)]  # (Hq, Hkv): GQA and MHA


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize(
    "pages,start,c",
    [
        ([0, 1, 2, 3, 4], 0, 17),  # start 0, odd length, adjacent pages
        ([5, 6, 7, 8, 9, 10], 0, 20),  # start 0, ends at a page boundary
        ([7, 2, 9, 3, 4, 0, 11], 6, 19),  # start mid-page, chunk crosses pages, shuffled
        ([3, 4, 1, 2, 6, 9, 10], 12, 13),  # start at a page boundary, prior keys in two runs
        ([2, 3, 4, 5, 6, 7], 9, 12),  # adjacent pages: prior keys and chunk are views
        ([8, 1, 5, 2, 9, 0, 3, 4, 6, 7], 21, 13),  # a full unmasked key block before the diagonal
    ],
)
def test_prefill_matches_oracle(impl, hq, hkv, pages, start, c):
    _check(impl, hq, hkv, pages, start, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_query_heads_per_kv_head_odd_head_dim(impl):
    _check(impl, 6, 2, [8, 9, 2, 3, 4, 11], 5, 17, scale=24**-0.5, seed=7, d=24)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_chunk(impl):
    _check(impl, 4, 2, [4, 2, 8], 9, 1, seed=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2)])  # GQA 1, 2, 4
@pytest.mark.parametrize(
    "pages,n_keys,c",
    [
        ([7, 2, 9, 3, 4, 0], 21, 17),  # scattered pages, n_keys mid-page, C not a multiple of 16
        ([3, 4, 5, 6, 7, 8, 9], 28, 5),  # adjacent pages: one view; n_keys a page multiple
        ([1, 2, 3, 8, 9, 10, 0, 5], 30, 33),  # two runs and a lone page; table longer than needed
        ([6, 11, 4], 1, 3),  # a single key
    ],
)
def test_prior_matches_oracle(impl, hq, hkv, pages, n_keys, c):
    _check_prior(impl, hq, hkv, pages, n_keys, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_prior_odd_head_dim(impl):
    _check_prior(impl, 6, 2, [8, 9, 2, 3, 4, 11], 22, 9, scale=24**-0.5, seed=7, d=24)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pages", [[3, 1], []])
def test_prior_without_keys_is_the_empty_partial(impl, pages):
    k_cache, v_cache = _cache(2)
    q = torch.randn(5, 4, D)
    out, lse = _run_prior(impl, q, k_cache, v_cache, torch.tensor(pages, dtype=torch.int32), 0, 0.3, PS)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.equal(lse, torch.full((5, 4), float("-inf")))


@pytest.mark.parametrize("shape", PREFILL_TILE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_under_every_tile_shape(shape):
    """Causal: the first query block has a full unmasked key block and starts 2 keys before a
    key-block edge (a diagonal that leaked into the unmasked stage would show); the last
    query block is partial. Prior: whole key blocks and a partial tail."""
    bm, bn = shape
    tiles = PrefillTiles(bm, bn)
    page_size = 8
    start, c = 2 * bn - 2, bm + 7
    n_pages = -(-(start + c) // page_size)
    pages = torch.randperm(n_pages + 3, generator=torch.Generator().manual_seed(bm + bn))[:n_pages].tolist()
    _check("triton", 4, 2, pages, start, c, d=16, page_size=page_size, tiles=tiles, seed=bm)
    _check_prior("triton", 4, 2, pages, 2 * bn + 3, 9, d=32, page_size=page_size, tiles=tiles,
                 seed=bn)


def test_cpu_bf16_close_to_fp32():
    k_cache, v_cache = _cache(2, seed=5)
    block_table = torch.tensor([6, 2, 3, 4, 10], dtype=torch.int32)
    q = torch.randn(9, 4, D, generator=torch.Generator().manual_seed(6))
    out, lse = prefill_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(),
                                 block_table, 7, 0.3, PS)
    ref_out, ref_lse = _prefill_torch(q, k_cache, v_cache, block_table, 7, 0.3, PS)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, ref_lse, atol=3e-2, rtol=3e-2)

    out, lse = prior_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), block_table, 17, 0.3, PS)
    ref_out, ref_lse = prior_attention(q, k_cache, v_cache, block_table, 17, 0.3, PS)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, ref_lse, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("device,capability", [("cpu", None), ("cuda:0", (9, 0)), ("cuda:0", (8, 0)),
                                               ("cuda:0", (7, 5))])
def test_prefill_tiles_picks_an_allowed_shape(monkeypatch, dtype, head_dim, device, capability):
    monkeypatch.setattr(prefill_mod, "_capability", lambda index: capability)
    tiles = prefill_tiles(head_dim, dtype, torch.device(device))
    assert isinstance(tiles, PrefillTiles)
    assert (tiles.block_m, tiles.block_n) in PREFILL_TILE_SHAPES
    if dtype == torch.float32:  # ieee fp32 dots hold twice the registers: smaller tiles
        assert tiles.block_m * tiles.block_n < 128 * 64
    elif capability in ((9, 0), (8, 0)):
        assert (tiles.block_m, tiles.block_n, tiles.num_stages) == (128, 64, 3)
        assert tiles.num_warps == (4 if head_dim == 64 else 8)


def test_device_capability_is_queried_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: calls.append(index) or (9, 0))
    prefill_mod._capability.cache_clear()
    try:
        for _ in range(3):
            prefill_tiles(128, torch.bfloat16, torch.device("cuda", 0))
    finally:
        prefill_mod._capability.cache_clear()
    assert calls == [0]


def test_tiles_reject_unknown_shapes():
    with pytest.raises(ValueError, match="PREFILL_TILE_SHAPES"):
        PrefillTiles(48, 16)
    with pytest.raises(ValueError, match="num_warps"):
        PrefillTiles(16, 16, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        PrefillTiles(16, 16, num_stages=0)


@pytest.mark.parametrize("fn", [prefill_attention, prior_attention])
def test_caller_mistakes_raise(fn):
    k_cache, v_cache = _cache(2)
    q = torch.randn(5, 4, D)
    bt = torch.arange(3, dtype=torch.int32)
    count = "start" if fn is prefill_attention else "n_keys"
    with pytest.raises(ValueError, match="exceed"):
        fn(q, k_cache, v_cache, bt, 8 if fn is prefill_attention else 13, 0.3, PS)
    with pytest.raises(ValueError, match=r"\[P\]"):
        fn(q, k_cache, v_cache, bt[None], 0, 0.3, PS)
    with pytest.raises(ValueError, match="int32"):
        fn(q, k_cache, v_cache, bt.long(), 0, 0.3, PS)
    with pytest.raises(ValueError, match=count):
        fn(q, k_cache, v_cache, bt, -1, 0.3, PS)
    with pytest.raises(ValueError, match=count):
        fn(q, k_cache, v_cache, bt, 2.0, 0.3, PS)
    with pytest.raises(ValueError, match="page ids"):
        fn(q, k_cache, v_cache, bt + N_PAGES, 4, 0.3, PS)
    with pytest.raises(ValueError, match="3-D"):
        fn(q[0], k_cache, v_cache, bt, 0, 0.3, PS)
