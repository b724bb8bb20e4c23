"""Block-quantised weights: unpacking GGUF bytes against gguf's own dequantisation, and the
numba GEMV against a float64 product with the dequantised weight."""

import gguf
import numpy as np
import pytest
from gguf import quants

from cpu_kernels.quant import FORMATS, gemv, quantize, quantize_rows, unpack


def _raw(kind, rows=48, cols=96, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind))


@pytest.mark.parametrize("kind", FORMATS)
def test_unpacked_blocks_dequantise_as_gguf_does(kind):
    raw = _raw(kind)
    want = quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    np.testing.assert_array_equal(unpack(raw, kind).dequantize(), want)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("n", [1, 3])
def test_gemv_is_the_product_with_the_dequantised_weight_of_int16_activations(kind, n):
    w = unpack(_raw(kind, seed=1), kind)
    x = np.random.default_rng(2).standard_normal((n, 96)).astype(np.float32)
    xq, xd, xsum = quantize_rows(x)
    # the activations as the GEMV sees them (int8 codes times their scale); the offsets of
    # Q4_1 multiply the exact sums
    x_seen = (xq.reshape(n, -1, 32) * xd[..., None].astype(np.float64)).reshape(n, 96)
    wd = w.dequantize().astype(np.float64)
    m = np.repeat(w.m, 32, axis=1).astype(np.float64)
    want = x_seen @ (wd - m).T + x.astype(np.float64) @ m.T
    np.testing.assert_allclose(gemv(w, x), want, rtol=1e-4, atol=1e-4)
    exact = x.astype(np.float64) @ wd.T  # and within the quantisation of x of the float product
    assert np.abs(gemv(w, x) - exact).max() <= 1e-4 * np.abs(exact).max()


def test_activations_round_each_block_to_its_absmax_scale():
    x = np.array([[0.0] * 32 + [1.0, -2.0] + [0.5] * 30], dtype=np.float32)
    xq, xd, xsum = quantize_rows(x)
    assert xq[0, :32].tolist() == [0] * 32 and xd[0, 0] == 0  # an all-zero block
    assert xq[0, 33] == -32767 and np.isclose(xd[0, 1], 2 / 32767) and xq[0, 32] == 16384
    np.testing.assert_allclose(xsum, [[0.0, -1.0 + 15.0]])


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported block format"):
        unpack(np.zeros((2, 20), np.uint8), "Q5_K")
    with pytest.raises(ValueError, match="whole blocks"):
        unpack(np.zeros((2, 21), np.uint8), "Q4_1")
    with pytest.raises(ValueError, match="columns"):
        gemv(unpack(_raw("Q8_0"), "Q8_0"), np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("kind", FORMATS)
def test_quantize_at_load_is_within_a_step_of_the_weight(kind):
    w = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    back = quantize(w, kind).dequantize()
    levels = {"Q8_0": 127, "Q4_0": 8, "Q4_1": 15}[kind]
    step = np.abs(w).reshape(8, 2, 32).max(axis=2) / levels  # per block (Q4_1's range / 15 is finer)
    assert (np.abs(back - w).reshape(8, 2, 32) <= step[..., None] + 1e-3).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(w[:, :40], kind)
