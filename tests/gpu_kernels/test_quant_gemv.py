import numpy as np
import pytest
import torch

from cpu_kernels.quant import QuantBlocks, unpack
from gpu_kernels import quant_linear
from gpu_kernels.quant_gemv import _quant_gemv_torch, _quant_gemv_triton

# Against the float64 oracle on the same (rounded) inputs: fp32 sums of products; in bf16 the
# output is rounded to bf16 (8 bits of mantissa), outputs are of order 1.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _oracle(x, q, d, m):
    """float64 ``x @ W.T`` with ``W = d * q + m`` per block of 32."""
    rows, cols = q.shape
    w = q.double().view(rows, -1, 32) * d.double()[..., None] + m.double()[..., None]
    return x.double() @ w.view(rows, cols).T


def _weights(rows, cols, offset, seed):
    """Q4_0-like codes (-8..7, m = 0) or Q4_1-like codes (0..15, non-zero m)."""
    g = torch.Generator().manual_seed(seed)
    nb = cols // 32
    d = torch.rand(rows, nb, generator=g) * 0.02 + 0.005
    if offset:
        q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int8)
        m = -8 * d + torch.randn(rows, nb, generator=g) * 0.01
    else:
        q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
        m = torch.zeros(rows, nb)
    return q, d, m


CASES = [  # (n, rows, cols, offset)
    (1, 13, 64, False), (3, 37, 64, True), (1, 20, 576, True), (3, 16, 576, False), (9, 5, 96, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, rows, cols, offset", CASES)
def test_matches_the_float64_oracle(n, rows, cols, offset, dtype):
    """Rows not a multiple of the row tile, column tiles past the last block (64 and 96 columns
    under tiles of 128; 576 = 4.5 tiles), n above the 8 rows of x per program (9)."""
    q, d, m = _weights(rows, cols, offset, seed=n + rows + cols)
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)
    ref = _oracle(x, q, d, m)
    atol, rtol = TOL[dtype]
    for out in (_quant_gemv_torch(x, q, d, m), _quant_gemv_triton(x, q, d, m), quant_linear(x, q, d, m)):
        assert out.dtype == dtype and out.shape == (n, rows)
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_r, blocks_per_tile", [(8, 2), (32, 1), (16, 8)])
def test_other_tiles(block_r, blocks_per_tile):
    q, d, m = _weights(45, 576, True, seed=1)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(2))
    out = _quant_gemv_triton(x, q, d, m, block_r=block_r, blocks_per_tile=blocks_per_tile)
    torch.testing.assert_close(out.double(), _oracle(x, q, d, m), atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_empty_batches():
    q, d, m = _weights(24, 64, True, seed=3)
    x = torch.randn(3, 128)[:, ::2]  # non-contiguous rows
    ref = _oracle(x, q, d, m)
    torch.testing.assert_close(_quant_gemv_triton(x, q, d, m).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quant_linear(x, q, d, m).double(), ref, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(0, 64)
    assert _quant_gemv_triton(empty, q, d, m).shape == quant_linear(empty, q, d, m).shape == (0, 24)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_match_their_dequantized_weight(kind):
    """``QuantBlocks`` unpacked from GGUF bytes, as the loader holds them."""
    rng = np.random.default_rng(4)
    per_block = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    raw = rng.integers(0, 256, (19, 3 * per_block), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (19, 3, 2)).astype(np.float16).view(np.uint8)  # finite d, m
    blocks = raw.reshape(19, 3, per_block)
    n_scales = 4 if kind == "Q4_1" else 2
    blocks[..., :n_scales] = scales.reshape(19, 3, 4)[..., :n_scales]
    w = unpack(raw, kind)
    assert isinstance(w, QuantBlocks)
    q, d, m = (torch.from_numpy(a) for a in w)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(5))
    ref = x.double() @ torch.from_numpy(w.dequantize()).double().T
    torch.testing.assert_close(_quant_gemv_triton(x, q, d, m).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quant_linear(x, q, d, m).double(), ref, atol=1e-5, rtol=1e-5)


def test_errors():
    q, d, m = _weights(8, 64, False, seed=6)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_linear(torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.int8), d[:, :1], m[:, :1])
    with pytest.raises(ValueError, match="columns"):
        quant_linear(torch.randn(2, 32), q, d, m)
    with pytest.raises(ValueError, match=r"\[n, cols\]"):
        quant_linear(torch.randn(64), q, d, m)
    with pytest.raises(ValueError, match="d and m must be"):
        quant_linear(x, q, d[:, :1], m)
    with pytest.raises(ValueError, match="d and m must be"):
        quant_linear(x, q, d, m[:7])
    with pytest.raises(ValueError, match="int8"):
        quant_linear(x, q.to(torch.int16), d, m)
    with pytest.raises(ValueError, match="float32"):
        quant_linear(x, q, d.double(), m)
    with pytest.raises(ValueError, match="x must be"):
        quant_linear(x.double(), q, d, m)
    with pytest.raises(ValueError, match="one device"):
        quant_linear(x.to("meta"), q, d, m)
