"""merge_partials (CPU torch path) and its Triton kernel against the float64 oracle."""

import pytest
import torch

from gpu_kernels import merge_partials
from gpu_kernels.merge import _merge_triton
from tests.oracle import attention_oracle

ATOL = RTOL = 1e-4  # fp32 results vs the float64 oracle


def _partial(q, k, v, idx, scale):
    """Oracle attention of q over the keys ``idx`` as a float32 (out, lse) partial."""
    out, lse = attention_oracle(q, k[idx], v[idx], torch.zeros(q.shape[0], dtype=torch.long),
                                torch.zeros(len(idx), dtype=torch.long), scale)
    return out.float(), lse.float()


def _merge(impl, *partials):
    if impl == "torch":
        return merge_partials(*partials)
    return _merge_triton(torch.stack([p[0] for p in partials]), torch.stack([p[1] for p in partials]),
                         partials[0][0].dtype)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 24, generator=g)  # Nq=3, Hq=4, D=24 (not a power of two)
    k = torch.randn(29, 2, 24, generator=g)
    v = torch.randn(29, 2, 24, generator=g)
    return q, k, v


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n_parts", [2, 3])
def test_merge_matches_full_attention(impl, n_parts, qkv):
    q, k, v = qkv
    perm = torch.randperm(29, generator=torch.Generator().manual_seed(1))
    parts = [_partial(q, k, v, idx, 0.3) for idx in perm.tensor_split(n_parts)]
    out, lse = _merge(impl, *parts)
    ref_out, ref_lse = _partial(q, k, v, torch.arange(29), 0.3)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_partials(impl, qkv):
    q, k, v = qkv
    full = _partial(q, k, v, torch.arange(29), 0.3)
    empty = (torch.zeros_like(full[0]), torch.full_like(full[1], float("-inf")))
    out, lse = _merge(impl, empty, full, empty)
    torch.testing.assert_close(out, full[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, full[1], atol=ATOL, rtol=RTOL)

    out, lse = _merge(impl, empty, empty)
    assert not out.isnan().any() and (out == 0).all()
    assert (lse == float("-inf")).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_partly_empty_rows(impl, qkv):
    """Rows where one side is empty and rows where both are, in one call."""
    q, k, v = qkv
    a = _partial(q, k, v, torch.arange(0, 10), 0.3)
    b = _partial(q, k, v, torch.arange(10, 29), 0.3)
    a[1][0] = float("-inf")
    a[0][0] = 0.0
    b[1][0, :2] = float("-inf")
    b[0][0, :2] = 0.0
    out, lse = _merge(impl, a, b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (lse[0, :2] == float("-inf")).all() and (out[0, :2] == 0).all()
    torch.testing.assert_close(out[0, 2:], b[0][0, 2:], atol=ATOL, rtol=RTOL)
    ref = _partial(q, k, v, torch.arange(29), 0.3)
    torch.testing.assert_close(out[1:], ref[0][1:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse[1:], ref[1][1:], atol=ATOL, rtol=RTOL)


def test_output_dtype_follows_first_partial(qkv):
    q, k, v = qkv
    a = _partial(q, k, v, torch.arange(0, 10), 0.3)
    b = _partial(q, k, v, torch.arange(10, 29), 0.3)
    out, lse = merge_partials((a[0].bfloat16(), a[1]), b)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref = _partial(q, k, v, torch.arange(29), 0.3)
    torch.testing.assert_close(out.float(), ref[0], atol=2e-2, rtol=2e-2)


def test_single_partial_is_returned():
    out, lse = torch.randn(2, 3, 8), torch.randn(2, 3)
    m_out, m_lse = merge_partials((out, lse))
    assert torch.equal(m_out, out) and torch.equal(m_lse, lse)


def test_caller_mistakes_raise():
    out, lse = torch.randn(2, 3, 8), torch.randn(2, 3)
    with pytest.raises(ValueError, match="at least one"):
        merge_partials()
    with pytest.raises(ValueError, match="lse shape"):
        merge_partials((out, torch.randn(2, 4)))
    with pytest.raises(ValueError, match="partial 1"):
        merge_partials((out, lse), (torch.randn(2, 3, 4), lse))
    with pytest.raises(ValueError, match="pair"):
        merge_partials((out, lse), out)
