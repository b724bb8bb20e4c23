"""MagicPIG's CPU kernels (codes, tables, probe, sampled attention) against plain references,
and against exact attention where every key is sampled."""

import math

import numpy as np
import pytest
import torch

from cpu_kernels import lsh
from cpu_kernels.lsh import (
    W_FLOOR, LSHTables, build_tables, centred_norms, lsh_attention, probe, sampled_attention, simhash_codes,
)
from gpu_kernels import merge_partials
from tests.cpu_kernels.lsh_reference import (
    build_tables_reference, collision_weight_reference, probe_reference, sampled_attention_reference,
    simhash_reference,
)
from tests.oracle import attention_oracle

ATOL = RTOL = 1e-5  # fp32 kernels vs float64 references


def _ints(rng, shape, lo=-2, hi=2):
    """Small integers as float32: projections are exact, so codes compare bit for bit."""
    return rng.integers(lo, hi + 1, size=shape).astype(np.float32)


def _exact(q, k, v, scale):
    """Oracle attention of q [Hq, D] over all keys k, v [Hkv, n, D] -> out [Hq, D], lse [Hq] (float64)."""
    n = k.shape[1]
    out, lse = attention_oracle(torch.as_tensor(q)[None], torch.as_tensor(k).transpose(0, 1),
                                torch.as_tensor(v).transpose(0, 1), torch.zeros(1, dtype=torch.long),
                                torch.zeros(n, dtype=torch.long), scale)
    return out[0], lse[0]


def _layer(rng, hkv, n, d, offset=3.0):
    """Keys with a large common offset (so centring matters), values, their mean and norms."""
    keys = (rng.standard_normal((hkv, n, d)) + offset * rng.standard_normal((hkv, 1, d))).astype(np.float32)
    values = rng.standard_normal((hkv, n, d)).astype(np.float32)
    mean = keys.mean(axis=1)
    return keys, values, mean, centred_norms(keys, mean)


@pytest.mark.parametrize("k,l", [(5, 4), (16, 2), (0, 3)])
def test_simhash_codes_match_reference(k, l, monkeypatch):
    monkeypatch.setattr(lsh, "_ROWS_PER_CHUNK", 16)  # 37 rows: three chunks, the last partial
    rng = np.random.default_rng(0)
    x, r, center = _ints(rng, (2, 37, 16)), _ints(rng, (16, k * l)), _ints(rng, (2, 16))
    codes = simhash_codes(x, r, k, l, center=center)
    assert codes.dtype == np.uint16 and codes.shape == (2, 37, l)
    expected = simhash_reference(torch.from_numpy(x), torch.from_numpy(r), k, l, torch.from_numpy(center))
    np.testing.assert_array_equal(codes, expected.numpy())
    np.testing.assert_array_equal(simhash_codes(x[1], r, k, l), simhash_reference(x[1], r, k, l).numpy())


def test_centred_norms():
    rng = np.random.default_rng(1)
    keys, _, mean, norms = _layer(rng, 2, 50, 16)
    np.testing.assert_allclose(norms, np.linalg.norm(keys - mean[:, None], axis=-1), rtol=1e-6)


@pytest.mark.parametrize("k", [0, 4])
def test_build_tables_match_reference(k):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2**k, size=(3, 200, 6)).astype(np.uint16)  # [Hkv, n, L]
    tables = build_tables(codes, k)
    assert tables.offsets.shape == (3, 6, 2**k + 1) and tables.ids.shape == (3, 6, 200)
    assert tables.offsets.dtype == tables.ids.dtype == np.int32
    assert (tables.k, tables.l, tables.n) == (k, 6, 200)
    assert tables.nbytes == 4 * 3 * 6 * (200 + 2**k + 1)
    for h in range(3):
        offsets, ids = build_tables_reference(codes[h], k)
        np.testing.assert_array_equal(tables.offsets[h], offsets.numpy())
        np.testing.assert_array_equal(tables.ids[h], ids.numpy())
        single = build_tables(codes[h], k)  # one head, [n, L]
        np.testing.assert_array_equal(single.ids, tables.ids[h])


@pytest.mark.parametrize("lo,hi", [(0, None), (5, 140), (60, 60)])
def test_probe_matches_reference(lo, hi):
    rng = np.random.default_rng(3)
    n, l, k = 150, 8, 2  # 4 buckets: many collisions, counts well past 2
    codes = rng.integers(0, 2**k, size=(n, l)).astype(np.uint16)
    tables = build_tables(codes, k)
    for seed in range(4):
        q_codes = np.random.default_rng(seed).integers(0, 2**k, size=l).astype(np.uint16)
        cand = probe(tables, q_codes, lo, hi)
        assert cand.dtype == np.int32
        expected = probe_reference(codes, q_codes, lo, n if hi is None else hi)
        np.testing.assert_array_equal(cand, expected.numpy())
    if hi == 60:
        assert len(cand) == 0


def test_probe_needs_two_collisions():
    # Key 0 collides in one table only, key 1 in two, key 2 in all three: only 1 and 2 qualify.
    codes = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint16)
    tables = build_tables(codes, 1)
    np.testing.assert_array_equal(probe(tables, np.ones(3, dtype=np.uint16)), [1, 2])
    np.testing.assert_array_equal(probe(tables, np.ones(3, dtype=np.uint16), lo=2), [2])


@pytest.mark.parametrize("k,l", [(4, 20), (10, 150)])
def test_sampled_attention_matches_reference(k, l):
    rng = np.random.default_rng(4)
    keys, values, mean, norms = _layer(rng, 1, 300, 24)  # rows of 96 bytes: not whole cache lines
    q = (2 * rng.standard_normal(24)).astype(np.float32)
    cand = rng.choice(300, size=70, replace=False).astype(np.int32)
    out, lse = sampled_attention(q, keys[0], values[0], norms[0], mean[0], cand, k, l, 0.25)
    ref_out, ref_lse = sampled_attention_reference(q, keys[0], values[0], mean[0], cand, k, l, 0.25)
    assert out.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(out).double(), ref_out, atol=ATOL, rtol=RTOL)
    assert lse == pytest.approx(ref_lse.item(), abs=ATOL, rel=RTOL)


def test_sampled_attention_empty():
    rng = np.random.default_rng(5)
    keys, values, mean, norms = _layer(rng, 1, 10, 16)
    out, lse = sampled_attention(np.ones(16), keys[0], values[0], norms[0], mean[0], [], 10, 150, 0.25)
    assert lse == -math.inf and (out == 0).all()


@pytest.mark.parametrize("angle", [0.3, 1.2])
def test_constant_weight_gives_exact_attention(angle):
    # Centred keys all along one direction +u, so every key has the same angle to q, hence
    # the same w: with every key a candidate, out is exact and lse is exact - log(w + floor).
    rng = np.random.default_rng(6)
    d, n, k, l, scale = 16, 120, 10, 150, 0.25
    u, v_perp = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    mu = 3 * rng.standard_normal(d)
    keys = (mu + rng.uniform(0.5, 3.0, size=(n, 1)) * u).astype(np.float32)[None]
    values = rng.standard_normal((1, n, d)).astype(np.float32)
    mean = mu.astype(np.float32)[None]  # the centre the keys were built around (their own mean would flip some)
    q = (2 * (math.cos(angle) * u + math.sin(angle) * v_perp)).astype(np.float32)
    out, lse = sampled_attention(q, keys[0], values[0], centred_norms(keys, mean)[0], mean[0],
                                 np.arange(n), k, l, scale)
    ref_out, ref_lse = _exact(q[None], keys, values, scale)
    w = collision_weight_reference(torch.tensor(math.cos(angle), dtype=torch.float64), k, l).item()
    torch.testing.assert_close(torch.from_numpy(out).double(), ref_out[0], atol=ATOL, rtol=RTOL)
    assert lse == pytest.approx(ref_lse.item() - math.log(w + W_FLOOR), abs=1e-4)


def test_full_pipeline_with_query_along_keys_is_exact():
    # q parallel to every centred key: all codes equal q's, every key collides in all tables,
    # w = 1. The full pipeline (hash, build, probe, attend) then gives exact attention.
    rng = np.random.default_rng(7)
    d, n, k, l, scale = 16, 200, 10, 150, 0.25
    u = rng.standard_normal(d)
    mu = 3 * rng.standard_normal(d)
    keys = (mu + rng.uniform(0.5, 3.0, size=(n, 1)) * u).astype(np.float32)[None]
    values = rng.standard_normal((1, n, d)).astype(np.float32)
    mean = mu.astype(np.float32)[None]  # the centre the keys were built around (their own mean would flip some)
    r = rng.standard_normal((d, k * l)).astype(np.float32)
    tables = build_tables(simhash_codes(keys, r, k, l, center=mean), k)
    q = (1.5 * u).astype(np.float32)[None]
    count = np.empty(1, dtype=np.int32)
    out, lse = lsh_attention(q, simhash_codes(q, r, k, l), keys, values, centred_norms(keys, mean), mean, tables,
                             scale, n_candidates=count)
    assert count[0] == n
    ref_out, ref_lse = _exact(q, keys, values, scale)
    torch.testing.assert_close(torch.from_numpy(out).double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.from_numpy(lse).double(), ref_lse - math.log1p(W_FLOOR), atol=1e-4, rtol=0)


def test_offloaded_partial_merges_with_device_partial():
    # K = 0: one bucket per table, so every key is sampled and w = 1. The CPU partial over the
    # offloaded keys [lo, hi) merged with the device's partial over sinks + local window must
    # equal exact attention over all keys; the keys have a large mean, so an lse off by
    # q.mean*scale (centred logits without the correction) would fail by far.
    rng = np.random.default_rng(8)
    hkv, hq, n, d, l, scale = 2, 6, 300, 16, 4, 0.25
    lo, hi = 4, n - 32
    keys, values, mean_all, _ = _layer(rng, hkv, n, d)
    mean = keys[:, lo:hi].mean(axis=1)
    tables = build_tables(simhash_codes(keys, np.zeros((d, 0), np.float32), 0, l, center=mean), 0)
    q = (2 * rng.standard_normal((hq, d))).astype(np.float32)
    q_codes = np.zeros((hq, l), np.uint16)  # the one bucket
    out, lse = lsh_attention(q, q_codes, keys, values, centred_norms(keys, mean), mean, tables, scale, lo=lo, hi=hi)
    off_out, off_lse = _exact(q, keys[:, lo:hi], values[:, lo:hi], scale)
    torch.testing.assert_close(torch.from_numpy(out).double(), off_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.from_numpy(lse).double(), off_lse - math.log1p(W_FLOOR), atol=ATOL, rtol=RTOL)

    held = np.r_[0:lo, hi:n]
    dev = _exact(q, keys[:, held], values[:, held], scale)
    merged_out, merged_lse = merge_partials(dev, (torch.from_numpy(out).double(), torch.from_numpy(lse).double()))
    ref_out, ref_lse = _exact(q, keys, values, scale)
    torch.testing.assert_close(merged_out, ref_out, atol=2e-4, rtol=0)  # the 1e-4 floor biases by <= 1e-4
    torch.testing.assert_close(merged_lse.double(), ref_lse, atol=2e-4, rtol=0)


@pytest.mark.parametrize("lo,hi", [(0, None), (4, 468)])
def test_lsh_attention_gqa_matches_reference(lo, hi):
    rng = np.random.default_rng(9)
    hkv, hq, n, cap, d, k, l, scale = 2, 6, 500, 512, 16, 3, 8, 0.25
    keys, values, _, _ = _layer(rng, hkv, cap, d)
    mean = keys[:, :n].mean(axis=1)
    r = rng.standard_normal((d, k * l)).astype(np.float32)
    codes = simhash_codes(keys[:, :n], r, k, l, center=mean)
    tables = build_tables(codes, k)
    norms = centred_norms(keys[:, :n], mean)
    q = (2 * rng.standard_normal((hq, d))).astype(np.float32)
    q_codes = simhash_codes(q, r, k, l)
    count = np.empty(hq, dtype=np.int32)
    out, lse = lsh_attention(q, q_codes, keys, values, norms, mean, tables, scale, lo=lo, hi=hi,
                             n_candidates=count)
    assert out.shape == (hq, d) and lse.shape == (hq,) and lse.dtype == np.float32
    for h in range(hq):
        kv = h // (hq // hkv)
        cand = probe_reference(codes[kv], q_codes[h], lo, n if hi is None else hi)
        assert 0 < count[h] == len(cand) < n
        np.testing.assert_array_equal(probe(LSHTables(tables.offsets[kv], tables.ids[kv]), q_codes[h], lo, hi), cand)
        ref_out, ref_lse = sampled_attention_reference(q[h], keys[kv], values[kv], mean[kv], cand, k, l, scale)
        torch.testing.assert_close(torch.from_numpy(out[h]).double(), ref_out, atol=ATOL, rtol=RTOL)
        assert lse[h] == pytest.approx(ref_lse.item(), abs=ATOL, rel=RTOL)


def test_lsh_attention_head_without_candidates():
    # Every key sits in bucket 0 of every table; head 1's query is in bucket 1 everywhere.
    rng = np.random.default_rng(10)
    keys, values, mean, norms = _layer(rng, 1, 40, 16)
    tables = build_tables(np.zeros((1, 40, 3), dtype=np.uint16), 2)
    q = rng.standard_normal((2, 16)).astype(np.float32)
    out, lse = lsh_attention(q, np.array([[0, 0, 0], [1, 1, 1]]), keys, values, norms, mean, tables, 0.25)
    assert np.isfinite(lse[0]) and lse[1] == -math.inf and (out[1] == 0).all()
    out, lse = lsh_attention(q, np.zeros((2, 3), np.uint16), keys, values, norms, mean, tables, 0.25, lo=20, hi=20)
    assert (lse == -math.inf).all() and (out == 0).all()
    # No offloaded keys yet (short prompt): empty tables.
    empty = build_tables(np.zeros((1, 0, 3), dtype=np.uint16), 2)
    out, lse = lsh_attention(q, np.zeros((2, 3), np.uint16), keys, values, norms[:, :0], mean, empty, 0.25)
    assert (lse == -math.inf).all() and (out == 0).all()


def test_caller_mistakes_raise():
    rng = np.random.default_rng(11)
    keys, values, mean, norms = _layer(rng, 1, 40, 16)
    tables = build_tables(np.zeros((1, 40, 3), dtype=np.uint16), 2)
    q, qc = np.ones((2, 16), np.float32), np.zeros((2, 3), np.uint16)
    with pytest.raises(TypeError, match="float32"):
        lsh_attention(q, qc, keys.astype(np.float64), values, norms, mean, tables, 0.25)
    with pytest.raises(ValueError, match="range"):
        lsh_attention(q, qc, keys, values, norms, mean, tables, 0.25, lo=0, hi=41)
    with pytest.raises(ValueError, match=r"2\*\*2"):
        lsh_attention(q, np.full((2, 3), 4), keys, values, norms, mean, tables, 0.25)
    with pytest.raises(ValueError, match="K"):
        build_tables(np.zeros((4, 3), np.uint16), 17)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*1\)"):
        build_tables(np.full((4, 3), 2, np.uint16), 1)


def test_concurrent_calls_from_threads():
    # CPU workers call the kernels from a thread pool (nogil): results must not depend on it.
    from concurrent.futures import ThreadPoolExecutor

    import numba

    rng = np.random.default_rng(12)
    keys, values, mean, norms = _layer(rng, 2, 400, 16)
    r = rng.standard_normal((16, 3 * 8)).astype(np.float32)
    tables = build_tables(simhash_codes(keys, r, 3, 8, center=mean), 3)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    q_codes = simhash_codes(q, r, 3, 8)
    expected = lsh_attention(q, q_codes, keys, values, norms, mean, tables, 0.25)
    if numba.threading_layer() == "workqueue":
        pytest.skip("numba's workqueue threading layer is not thread-safe (install tbb, or use omp)")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: lsh_attention(q, q_codes, keys, values, norms, mean, tables, 0.25),
                                range(16)))
    for out, lse in results:
        np.testing.assert_array_equal(out, expected[0])
        np.testing.assert_array_equal(lse, expected[1])
