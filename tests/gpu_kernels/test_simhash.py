"""simhash_codes: the Triton kernel (interpreter) and the CPU path against the reference, and
the same packing as the numba tables (cpu_kernels.lsh)."""

import pytest
import torch

from cpu_kernels.lsh import simhash_codes as cpu_simhash_codes
from gpu_kernels import simhash
from gpu_kernels.simhash import _simhash_triton, simhash_codes
from tests.cpu_kernels.lsh_reference import simhash_reference


def _ints(g, *shape):
    """Small integers as float32 (with exact zeros among the projections): codes compare exactly."""
    return torch.randint(-2, 3, shape, generator=g).float()


@pytest.mark.parametrize("n,d,k,l", [(45, 24, 10, 3), (70, 64, 16, 2), (5, 16, 3, 4)])
@pytest.mark.parametrize("centred", [False, True])
def test_triton_matches_reference(n, d, k, l, centred):
    g = torch.Generator().manual_seed(n + k)
    x, r = _ints(g, n, d), _ints(g, d, k * l)
    center = _ints(g, d) if centred else None
    codes = _simhash_triton(x, r, k, l, center, tables_per_program=2)  # l = 3: a partial group
    assert codes.dtype == torch.uint16 and codes.shape == (n, l)
    torch.testing.assert_close(codes.long(), simhash_reference(x, r, k, l, center))


def test_triton_reads_strided_rows():
    g = torch.Generator().manual_seed(1)
    x, r = _ints(g, 20, 2, 32)[:, 1], _ints(g, 32, 20)  # rows with stride 64
    torch.testing.assert_close(_simhash_triton(x, r, 10, 2, None).long(), simhash_reference(x, r, 10, 2))


@pytest.mark.parametrize("k,l", [(10, 5), (0, 3)])
def test_launcher_cpu_path_matches_reference_and_numba(k, l, monkeypatch):
    monkeypatch.setattr(simhash, "_ROWS_PER_CHUNK", 16)  # 33 rows: three chunks, the last partial
    g = torch.Generator().manual_seed(2)
    x, r, center = _ints(g, 3, 33, 16), _ints(g, 16, k * l), _ints(g, 3, 16)
    codes = simhash_codes(x, r, k, l, center=center)
    assert codes.dtype == torch.uint16 and codes.shape == (3, 33, l)
    torch.testing.assert_close(codes.long(), simhash_reference(x, r, k, l, center))
    # The device's codes index the CPU worker's tables: the packing must agree bit for bit.
    torch.testing.assert_close(codes.long(), torch.from_numpy(
        cpu_simhash_codes(x.numpy(), r.numpy(), k, l, center=center.numpy()).astype("int64")))
    q = x[:, 0]  # queries [Hq, D]: no centre
    torch.testing.assert_close(simhash_codes(q, r, k, l).long(), simhash_reference(q, r, k, l))


def test_caller_mistakes_raise():
    x, r = torch.zeros(4, 16), torch.zeros(16, 30)
    with pytest.raises(ValueError, match="K\\*L"):
        simhash_codes(x, r, 10, 2)
    with pytest.raises(ValueError, match="k"):
        simhash_codes(x, torch.zeros(16, 34), 17, 2)
    with pytest.raises(ValueError, match="center"):
        simhash_codes(x, r, 10, 3, center=torch.zeros(2, 16))
