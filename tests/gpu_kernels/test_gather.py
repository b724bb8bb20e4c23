import pytest
import torch

from gpu_kernels import gather_head_pages
from gpu_kernels.gather import _gather_triton


def _case(seed=0, hkv=3, ps=4, d=16, n_host=9, n_pool=7, k=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    host = torch.randn(2, hkv, n_host * ps, d, generator=g).to(dtype)
    pool = torch.randn(2, hkv, n_pool * ps, d, generator=g).to(dtype)
    src = torch.stack([torch.randperm(n_host, generator=g)[:k] for _ in range(hkv)])
    dst = torch.stack([torch.randperm(n_pool, generator=g)[:k] for _ in range(hkv)])
    valid = torch.rand(hkv, k, generator=g) < 0.6
    return host, pool, src, dst, valid, ps


def _oracle(host, pool, src, dst, valid, ps):
    out = pool.clone()
    for h in range(src.shape[0]):
        for j in range(src.shape[1]):
            if valid[h, j]:
                s, t = int(src[h, j]), int(dst[h, j])
                out[:, h, t * ps : (t + 1) * ps] = host[:, h, s * ps : (s + 1) * ps]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_and_triton_paths_copy_exactly_the_valid_entries(seed, dtype):
    host, pool, src, dst, valid, ps = _case(seed, dtype=dtype)
    want = _oracle(host, pool, src, dst, valid, ps)
    cpu, tri = pool.clone(), pool.clone()
    gather_head_pages(host, cpu, src, dst, valid, ps)
    _gather_triton(host, tri, src, dst, valid, ps)  # the interpreter (TRITON_INTERPRET=1)
    assert torch.equal(cpu, want) and torch.equal(tri, want)


def test_nothing_valid_copies_nothing():
    host, pool, src, dst, valid, ps = _case()
    before = pool.clone()
    gather_head_pages(host, pool, src, dst, torch.zeros_like(valid), ps)
    assert torch.equal(pool, before)


def test_shape_errors():
    host, pool, src, dst, valid, ps = _case()
    with pytest.raises(ValueError, match="alike"):
        gather_head_pages(host[:, :2], pool, src, dst, valid, ps)
    with pytest.raises(ValueError, match=r"\[Hkv, k\]"):
        gather_head_pages(host, pool, src[:, :2], dst, valid, ps)
    with pytest.raises(ValueError, match="differ"):
        gather_head_pages(host.half(), pool, src, dst, valid, ps)
