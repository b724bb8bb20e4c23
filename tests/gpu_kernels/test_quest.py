import pytest
import torch

from gpu_kernels import quest_page_scores
from gpu_kernels.quest import _quest_torch, _quest_triton


def _brute(q, kmin, kmax):
    """Per query head: sum_d max(q_d*kmax_d, q_d*kmin_d); per KV head: max over its group."""
    hkv = kmin.shape[0]
    g = q.shape[0] // hkv
    out = torch.empty(hkv, kmin.shape[1], dtype=torch.float64)
    for h in range(hkv):
        qg = q[h * g : (h + 1) * g].double()[:, None, :]
        bound = torch.maximum(qg * kmax[h].double(), qg * kmin[h].double()).sum(-1)
        out[h] = bound.amax(0)
    return out


@pytest.mark.parametrize("hq, hkv, pages, d", [(4, 2, 37, 16), (3, 3, 5, 32), (9, 3, 130, 64)])
def test_scores_match_the_bound(hq, hkv, pages, d):
    torch.manual_seed(0)
    q = torch.randn(hq, d)
    a, b = torch.randn(2, hkv, pages, d)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    ref = _brute(q, kmin, kmax)
    torch.testing.assert_close(_quest_torch(q, kmin, kmax).double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(_quest_triton(q, kmin, kmax).double(), ref, atol=1e-4, rtol=1e-5)


def test_bound_is_an_upper_bound_of_every_key_in_the_page():
    torch.manual_seed(1)
    keys = torch.randn(2, 6, 8, 16)  # [Hkv, pages, tokens, D]
    q = torch.randn(4, 16)
    scores = quest_page_scores(q, keys.amin(2), keys.amax(2))
    qk = torch.einsum("hgd,hptd->hgpt", q.view(2, 2, 16), keys).amax(dim=(1, 3))
    assert (scores >= qk - 1e-5).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="GQA"):
        quest_page_scores(torch.randn(3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="kmin"):
        quest_page_scores(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
