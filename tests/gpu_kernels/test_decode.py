"""paged_decode_attention: CPU path and Triton kernel (interpreter) against the float64 oracle."""

import pytest
import torch

from gpu_kernels import _paged, decode, paged_decode_attention
from gpu_kernels.decode import _decode_torch, _decode_triton
from tests.oracle import attention_oracle

ATOL = RTOL = 1e-4  # fp32 results vs the float64 oracle
D, PS, N_PAGES = 16, 4, 12


def _cache(hkv, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hkv, N_PAGES * PS, d, generator=g), torch.randn(hkv, N_PAGES * PS, d, generator=g)


def _reference(q, k_cache, v_cache, block_table, kv_lens, scale):
    """Gather each (sequence, KV head)'s keys through its table and run the oracle."""
    b, hq, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    out = torch.empty(b, hq, d, dtype=torch.float64)
    lse = torch.empty(b, hq, dtype=torch.float64)
    for i in range(b):
        for h in range(hkv):
            n = int(kv_lens[i, h])
            t = torch.arange(n)
            slots = block_table[i, h][t // PS].long() * PS + t % PS
            o, l = attention_oracle(q[i, None, h * g:(h + 1) * g], k_cache[h, slots][:, None],
                                    v_cache[h, slots][:, None], torch.tensor([n]), t, scale)
            out[i, h * g:(h + 1) * g], lse[i, h * g:(h + 1) * g] = o[0], l[0]
    return out, lse


@pytest.fixture(autouse=True)
def _cpu_variant(request, monkeypatch):
    """CPU variants on tiny shapes: ``cpu`` (short runs gathered), ``cpu-views`` (every run a
    view), ``cpu-mixed`` (runs of 8+ tokens are views), ``cpu-split`` (views split over 3 threads)."""
    impl = request.node.callspec.params.get("impl") if getattr(request.node, "callspec", None) else None
    if impl in ("cpu-views", "cpu-mixed", "cpu-split"):
        monkeypatch.setattr(_paged, "MIN_VIEW_TOKENS", 8 if impl == "cpu-mixed" else 1)
    if impl == "cpu-split":
        monkeypatch.setattr(decode, "_MIN_SPLIT_TOKENS", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        yield
        torch.set_num_threads(threads)
    else:
        yield


def _run(impl, *args):
    if impl.startswith("cpu"):
        return paged_decode_attention(*args)
    # Small tiles and several splits so the interpreter exercises split-K and the merge.
    return _decode_triton(*args, block_n=16, num_splits=3)


def _check(impl, q, k_cache, v_cache, block_table, kv_lens, scale=0.3):
    out, lse = _run(impl, q, k_cache, v_cache, block_table, kv_lens, scale, PS)
    ref_out, ref_lse = _reference(q, k_cache, v_cache, block_table, kv_lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)


IMPLS = ["cpu", "cpu-views", "cpu-mixed", "cpu-split", "triton"]
HEADS = [(4, 2), (2, 2)]  # (Hq, Hkv): GQA and MHA


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_shared_table_expanded(impl, hq, hkv):
    """Dense use: one page list for every head (stride-0 view), partly non-adjacent pages."""
    k_cache, v_cache = _cache(hkv)
    pages = torch.tensor([2, 3, 4, 9, 0, 1, 7], dtype=torch.int32)
    block_table = pages.expand(3, hkv, -1)
    # odd, exactly at a page boundary, a single token
    kv_lens = torch.tensor([[23], [16], [1]], dtype=torch.int32).expand(3, hkv)
    q = torch.randn(3, hq, D, generator=torch.Generator().manual_seed(1))
    _check(impl, q, k_cache, v_cache, block_table, kv_lens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_per_head_tables_and_empty_heads(impl, hq, hkv):
    """Sparse use: shuffled, different pages and lengths per KV head; some heads empty."""
    k_cache, v_cache = _cache(hkv, seed=2)
    g = torch.Generator().manual_seed(3)
    block_table = torch.stack(
        [torch.stack([torch.randperm(N_PAGES, generator=g)[:6] for _ in range(hkv)]) for _ in range(2)]
    ).to(torch.int32)
    kv_lens = torch.tensor([[17, 0], [8, 24]], dtype=torch.int32)[:, :hkv]
    if hkv == 2:
        block_table[1, 1] = block_table[1, 0]  # equal rows, different lengths: per-head path
    q = torch.randn(2, hq, D, generator=g)
    _check(impl, q, k_cache, v_cache, block_table, kv_lens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_per_head_tables_equal_lengths(impl, hq, hkv):
    """Quest's shape: every KV head lists different pages of equal count, the last one
    partial (one gather for all heads on CPU); garbage past the used pages is ignored."""
    k_cache, v_cache = _cache(hkv, seed=12)
    g = torch.Generator().manual_seed(13)
    block_table = torch.stack(
        [torch.stack([torch.randperm(N_PAGES, generator=g)[:7] for _ in range(hkv)]) for _ in range(2)]
    ).to(torch.int32)
    block_table[:, :, 6] = 99  # beyond kv_lens
    kv_lens = torch.tensor([[23], [24]], dtype=torch.int32).expand(2, hkv)
    q = torch.randn(2, hq, D, generator=g)
    _check(impl, q, k_cache, v_cache, block_table, kv_lens)


def test_per_head_tables_page_out_of_range():
    k_cache, v_cache = _cache(2, seed=14)
    block_table = torch.tensor([[[0, 1, 2], [3, 4, N_PAGES]]], dtype=torch.int32)
    kv_lens = torch.tensor([[10, 10]], dtype=torch.int32)
    with pytest.raises(ValueError, match="page ids must lie in"):
        paged_decode_attention(torch.randn(1, 4, D), k_cache, v_cache, block_table, kv_lens, 0.3, PS)


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_table_different_lengths(impl):
    """One expanded page list, but KV heads with different lengths (one of them empty)."""
    k_cache, v_cache = _cache(2, seed=10)
    block_table = torch.tensor([6, 7, 8, 2, 3], dtype=torch.int32).expand(1, 2, -1)
    kv_lens = torch.tensor([[0, 18]], dtype=torch.int32)
    q = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(11))
    _check(impl, q, k_cache, v_cache, block_table, kv_lens)


@pytest.mark.parametrize("impl", IMPLS)
def test_equal_rows_not_expanded(impl):
    """Same pages in every head's row (materialised, not stride 0) plus garbage past the used pages."""
    k_cache, v_cache = _cache(2, seed=4)
    block_table = torch.tensor([[5, 6, 7, 1, 2, 0]], dtype=torch.int32).repeat(2, 2, 1)
    block_table[:, :, 5] = torch.tensor([[11, 3], [0, 0]])  # ignored: beyond kv_len
    kv_lens = torch.tensor([[18, 18], [20, 20]], dtype=torch.int32)
    q = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(5))
    _check(impl, q, k_cache, v_cache, block_table, kv_lens)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_query_heads_per_kv_head_odd_head_dim(impl):
    """The default model's grouping (G=3) with a head_dim that is not a power of two."""
    k_cache, v_cache = _cache(2, seed=8, d=24)
    block_table = torch.tensor([[[1, 2, 3, 4, 5, 6], [9, 10, 11, 0, 7, 8]]], dtype=torch.int32)
    kv_lens = torch.tensor([[21, 14]], dtype=torch.int32)
    q = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(9))
    _check(impl, q, k_cache, v_cache, block_table, kv_lens, scale=24**-0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_empty(impl):
    k_cache, v_cache = _cache(2)
    block_table = torch.zeros(2, 2, 3, dtype=torch.int32)
    kv_lens = torch.zeros(2, 2, dtype=torch.int32)
    q = torch.randn(2, 4, D)
    out, lse = _run(impl, q, k_cache, v_cache, block_table, kv_lens, 0.3, PS)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_cpu_bf16_close_to_fp32():
    k_cache, v_cache = _cache(2, seed=6)
    block_table = torch.tensor([3, 4, 5, 8, 9], dtype=torch.int32).expand(2, 2, -1)
    kv_lens = torch.tensor([[19, 19], [7, 7]], dtype=torch.int32)
    q = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(7))
    out, lse = paged_decode_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(),
                                      block_table, kv_lens, 0.3, PS)
    ref_out, ref_lse = _decode_torch(q, k_cache, v_cache, block_table, kv_lens, 0.3, PS)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, ref_lse, atol=3e-2, rtol=3e-2)


def test_caller_mistakes_raise():
    k_cache, v_cache = _cache(2)
    q = torch.randn(1, 4, D)
    bt = torch.zeros(1, 2, 3, dtype=torch.int32)
    lens = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k_cache, v_cache, bt.long(), lens, 0.3, PS)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_attention(torch.randn(1, 3, D), k_cache, v_cache, bt, lens, 0.3, PS)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 4, 8), k_cache, v_cache, bt, lens, 0.3, PS)
    with pytest.raises(ValueError, match="kv_lens must have shape"):
        paged_decode_attention(q, k_cache, v_cache, bt, lens[:, :1], 0.3, PS)
    with pytest.raises(ValueError, match="kv_lens"):
        paged_decode_attention(q, k_cache, v_cache, bt, lens * 13, 0.3, PS)
    with pytest.raises(ValueError, match="page ids"):
        paged_decode_attention(q, k_cache, v_cache, bt + N_PAGES, lens, 0.3, PS)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.double(), k_cache, v_cache, bt, lens, 0.3, PS)
    with pytest.raises(ValueError, match="page_size"):
        paged_decode_attention(q, k_cache, v_cache, bt, lens, 0.3, 5)
