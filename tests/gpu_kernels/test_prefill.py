"""prefill_attention: CPU path and Triton kernel (interpreter) against the float64 oracle."""

import pytest
import torch

from gpu_kernels import _paged, prefill_attention
from gpu_kernels.prefill import _prefill_torch, _prefill_triton
from tests.oracle import attention_oracle

ATOL = RTOL = 1e-4  # fp32 results vs the float64 oracle
D, PS, N_PAGES = 16, 4, 12


def _cache(hkv, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hkv, N_PAGES * PS, d, generator=g), torch.randn(hkv, N_PAGES * PS, d, generator=g)


@pytest.fixture(autouse=True)
def _cpu_variant(request, monkeypatch):
    """``cpu``: short prior runs are gathered on these tiny shapes; ``cpu-views``: every run a view."""
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("impl") == "cpu-views":
        monkeypatch.setattr(_paged, "MIN_VIEW_TOKENS", 1)


def _run(impl, *args):
    if impl.startswith("cpu"):
        return prefill_attention(*args)
    return _prefill_triton(*args, block_m=16, block_n=16)


def _check(impl, hq, hkv, pages, start, c, scale=0.3, seed=0, d=D):
    k_cache, v_cache = _cache(hkv, seed, d)
    block_table = torch.tensor(pages, dtype=torch.int32)
    q = torch.randn(c, hq, d, generator=torch.Generator().manual_seed(seed + 1))
    out, lse = _run(impl, q, k_cache, v_cache, block_table, start, scale, PS)

    t = torch.arange(start + c)
    slots = block_table[t // PS].long() * PS + t % PS
    k, v = k_cache[:, slots].transpose(0, 1), v_cache[:, slots].transpose(0, 1)
    ref_out, ref_lse = attention_oracle(q, k, v, start + torch.arange(c), t, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (c, hq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)


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


def test_caller_mistakes_raise():
    k_cache, v_cache = _cache(2)
    q = torch.randn(5, 4, D)
    bt = torch.arange(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="exceed"):
        prefill_attention(q, k_cache, v_cache, bt, 8, 0.3, PS)
    with pytest.raises(ValueError, match=r"\[P\]"):
        prefill_attention(q, k_cache, v_cache, bt[None], 0, 0.3, PS)
    with pytest.raises(ValueError, match="int32"):
        prefill_attention(q, k_cache, v_cache, bt.long(), 0, 0.3, PS)
    with pytest.raises(ValueError, match="start"):
        prefill_attention(q, k_cache, v_cache, bt, -1, 0.3, PS)
    with pytest.raises(ValueError, match="page ids"):
        prefill_attention(q, k_cache, v_cache, bt + N_PAGES, 0, 0.3, PS)
    with pytest.raises(ValueError, match="3-D"):
        prefill_attention(q[0], k_cache, v_cache, bt, 0, 0.3, PS)
