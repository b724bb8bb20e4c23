"""LSHWorker: tables over the host tier's offloaded rows, sampled attention against the
kernels' torch references, the exact limit (K=0 samples every key), the exactly attended
tail, an own copy filled from rows (a worker in another process) equal to views, a half
precision host tier converted into an own copy equal to its float32 conversion, release and
bad arguments."""

import math

import numpy as np
import pytest
import torch

from hetero.backend import HostRows, HostTier
from orchestrator.lsh_worker import LSHWorker
from tests.cpu_kernels.lsh_reference import (
    probe_reference, sampled_attention_reference, simhash_reference,
)

HKV, G, CAP, D = 2, 3, 160, 16
SCALE = D**-0.5
LAYER = 5


def _host(seed=0, integer=False):
    """A layer's host tier [Hkv, capacity, D] (K and V), float32, by token position."""
    g = torch.Generator().manual_seed(seed)
    if integer:  # dyadic data: projections are exact in float32 and float64 alike
        k = torch.randint(-4, 5, (HKV, CAP, D), generator=g).float()
    else:
        k = torch.randn(HKV, CAP, D, generator=g)
    return k, torch.randn(HKV, CAP, D, generator=g)


def _exact(q, k, v, lo, hi):
    """Exact partial of q [Hq, D] over positions [lo, hi) of k, v [Hkv, cap, D] (float64)."""
    kk = k[:, lo:hi].double().repeat_interleave(G, 0)
    logits = torch.einsum("hd,hnd->hn", q.double(), kk) * SCALE
    lse = torch.logsumexp(logits, -1)
    return torch.einsum("hn,hnd->hd", torch.softmax(logits, -1), v[:, lo:hi].double().repeat_interleave(G, 0)), lse


def _tier(seq, layer, keys, values, lo, hi):
    """A HostTier argument: positions [lo, hi) of a host tier read in place."""
    return HostTier(seq, layer, keys, values, lo, hi)


def _at(seq, layer, hi):
    """The host argument of an attention call in the process (the views kept at the build
    are read): the offloaded positions end at ``hi``."""
    return HostTier(seq, layer, None, None, 0, hi)


def _rows(seq, start, stop, first, keys, values):
    """A HostRows argument: rows [first, stop) of positions [start, stop), as sent."""
    return HostRows(seq, LAYER, start, stop, first, keys[:, first:stop].numpy(), values[:, first:stop].numpy(), CAP)


def _worker(k, l, seed=1, integer=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-2, 3, (D, k * l), generator=g).float() if integer else torch.randn(D, k * l, generator=g)
    return LSHWorker({LAYER: r.numpy()}, k, l, SCALE), r


def test_attend_matches_the_kernel_references():
    k_bits, l_tables, lo, hi = 3, 12, 16, 16 + 64  # 64 offloaded rows: their mean is dyadic
    keys, values = _host(integer=True)
    worker, r = _worker(k_bits, l_tables, integer=True)
    worker.build(_tier(7, LAYER, keys, values, lo, hi))
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(3))
    q_codes = simhash_reference(q, r, k_bits, l_tables)
    out, lse = worker.attend(q, q_codes.to(torch.int32), _at(7, LAYER, hi))
    n_sampled = 0
    for h in range(HKV * G):
        kv = h // G
        mean = keys[kv, lo:hi].double().mean(0)
        codes = simhash_reference(keys[kv, lo:hi], r, k_bits, l_tables, center=mean)
        cand = probe_reference(codes, q_codes[h], 0, hi - lo) + lo
        n_sampled += len(cand)
        ref_out, ref_lse = sampled_attention_reference(q[h], keys[kv], values[kv], mean, cand, k_bits,
                                                       l_tables, SCALE)
        torch.testing.assert_close(out[h].double(), ref_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lse[h].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert 0 < n_sampled < HKV * G * (hi - lo)  # a real sample, neither nothing nor all
    assert worker.keys_read == n_sampled and worker.keys_offloaded == HKV * G * (hi - lo)


@pytest.mark.parametrize("tail", [0, 24])
def test_zero_bits_sample_every_key_and_the_tail_is_exact(tail):
    # K=0: every key shares bucket 0 of every table, w = 1: exact attention (lse short by
    # log(1 + 1e-4), the estimator's floor); tokens offloaded after the build are exact too
    keys, values = _host()
    worker, _ = _worker(0, 2)
    lo, hi = 16, 100
    worker.build(_tier(0, LAYER, keys, values, lo, hi))
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(5))
    codes = torch.zeros(HKV * G, 2, dtype=torch.uint16)
    out, lse = worker.attend(q, codes, _at(0, LAYER, hi + tail))
    ref_out, ref_lse = _exact(q, keys, values, lo, hi + tail)
    # merged with the exact tail, the sampled part weighs 1e-4 too little (the floor)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=1e-4)
    # the sampled part's lse is short by log(1 + 1e-4); the merged one by less
    assert ((ref_lse - lse.double()) >= -1e-5).all() and ((ref_lse - lse.double()) <= 1.1e-4).all()
    assert worker.keys_read == worker.keys_offloaded == HKV * G * (hi + tail - lo)


def test_a_dominant_tail_key_is_not_lost():
    # the tables sample almost nothing (16 bits, 2 tables); a key offloaded after the build
    # that matches the query strongly must take over the output
    keys, values = _host()
    worker, r = _worker(16, 2)
    worker.build(_tier(0, LAYER, keys, values, 16, 96))
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(5))
    keys[:, 100] = q[::G] * 10.0  # written in place: the worker reads the host tier as is
    out, _ = worker.attend(q, simhash_reference(q, r, 16, 2).to(torch.int32), _at(0, LAYER, 112))
    for h in range(0, HKV * G, G):  # the first query head of each group matches the key
        torch.testing.assert_close(out[h], values[h // G, 100], atol=1e-3, rtol=1e-3)


def test_state_reads_the_host_tier_in_place_and_release_frees_it():
    keys, values = _host()
    worker, _ = _worker(4, 8)
    worker.build(_tier(3, LAYER, keys, values, 16, 144))
    worker.build(_tier(4, LAYER, keys, values, 16, 80))
    st = worker.state[(3, LAYER)]
    assert np.shares_memory(st.keys, keys.numpy()) and np.shares_memory(st.values, values.numpy())
    per_key = 4 * 8  # int32 id in each of L tables
    offsets = 4 * 8 * (2**4 + 1)
    expected = HKV * (per_key * 144 + offsets + 4 * 144 + 4 * D)  # tables, norms, mean
    assert worker.table_bytes(3) == {LAYER: expected}
    assert worker.table_bytes()[LAYER] > expected
    worker.release(3)
    assert worker.table_bytes(3) == {LAYER: 0} and worker.has(4, LAYER)
    with pytest.raises(ValueError, match="no LSH tables"):
        worker.attend(torch.zeros(HKV * G, D), torch.zeros(HKV * G, 8, dtype=torch.int32), _at(3, LAYER, 144))


def test_an_older_build_does_not_replace_a_newer_one():
    keys, values = _host()
    worker, _ = _worker(4, 8)
    worker.build(_tier(0, LAYER, keys, values, 16, 128))
    worker.build(_tier(0, LAYER, keys, values, 16, 64))
    assert worker.state[(0, LAYER)].hi == 128


def test_nothing_offloaded_gives_an_empty_partial():
    keys, values = _host()
    worker, _ = _worker(4, 8)
    worker.build(_tier(0, LAYER, keys, values, 16, 16))
    out, lse = worker.attend(torch.ones(HKV * G, D), torch.zeros(HKV * G, 8, dtype=torch.int32), _at(0, LAYER, 16))
    assert (out == 0).all() and (lse == -math.inf).all()


@pytest.mark.parametrize("make, match", [
    (lambda: LSHWorker({}, 17, 8, 1.0), "k"),
    (lambda: LSHWorker({}, 4, 1, 1.0), "l"),
    (lambda: LSHWorker({0: np.zeros((D, 5), np.float32)}, 4, 8, 1.0), "K\\*L"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_calls():
    keys, values = _host()
    worker, _ = _worker(4, 8)
    with pytest.raises(ValueError, match="not served"):
        worker.build(_tier(0, LAYER + 1, keys, values, 16, 64))
    with pytest.raises(ValueError, match="capacity"):
        worker.build(_tier(0, LAYER, keys, values, 16, CAP + 1))
    with pytest.raises(TypeError, match="float32"):
        worker.build(_tier(0, LAYER, keys.double(), values.double(), 16, 64))
    with pytest.raises(TypeError, match="one dtype"):
        worker.build(_tier(0, LAYER, keys.bfloat16(), values, 16, 64))
    with pytest.raises(TypeError, match="one dtype"):
        worker.build(_tier(0, LAYER, keys.bfloat16(), values.half(), 16, 64))
    worker.build(_tier(0, LAYER, keys, values, 16, 64))
    with pytest.raises(ValueError, match="the offloaded positions end at 32"):
        worker.attend(torch.zeros(HKV * G, D), torch.zeros(HKV * G, 8, dtype=torch.int32), _at(0, LAYER, 32))
    with pytest.raises(TypeError, match="HostTier or HostRows"):
        worker.build((0, LAYER, keys, values, 16, 64))


def _viewer_and_owner(keys, values):
    """Two workers with tables over positions [16, 96): one viewing the host tier, one
    filled from its rows (as a worker in another process is); and their projection."""
    viewer, r = _worker(4, 8)
    owner, _ = _worker(4, 8)
    viewer.build(_tier(0, LAYER, keys, values, 16, 96))
    owner.build(_rows(0, 16, 96, 16, keys, values))
    return viewer, owner, r


def test_an_own_copy_filled_from_rows_equals_views_of_the_host_tier():
    # a worker in another process receives the rows instead of viewing the host tier
    keys, values = _host()
    viewer, owner, r = _viewer_and_owner(keys, values)
    assert not np.shares_memory(owner.state[(0, LAYER)].keys, keys.numpy())
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(4))
    codes = simhash_reference(q, r, 4, 8).to(torch.int32)
    tail = _rows(0, 16, 112, 96, keys, values)
    for want, got in zip(viewer.attend(q, codes, _at(0, LAYER, 112)), owner.attend(q, codes, tail)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert owner.key_counts() == viewer.key_counts()
    owner.release(0)
    assert not owner.copies and not owner.state


def test_bad_rows():
    keys, values = _host()
    worker, _ = _worker(4, 8)
    with pytest.raises(TypeError, match="float32"):
        worker.build(_rows(0, 16, 32, 16, keys.double(), values.double()))
    with pytest.raises(ValueError, match="capacity"):
        worker.build(HostRows(0, LAYER, 16, CAP + 8, CAP - 8, keys[:, 16:32].numpy(), values[:, 16:32].numpy(), CAP))


def test_rows_fill_the_copy_across_calls():
    # the first call brings [16, 96), the next only [96, 112): the copy holds both
    keys, values = _host()
    viewer, owner, r = _viewer_and_owner(keys, values)
    owner.build(_rows(0, 16, 112, 96, keys, values))  # a rebuild with the tail only
    viewer.build(_tier(0, LAYER, keys, values, 16, 112))
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(4))
    codes = simhash_reference(q, r, 4, 8).to(torch.int32)
    empty = _rows(0, 16, 112, 112, keys, values)  # nothing new
    for want, got in zip(viewer.attend(q, codes, _at(0, LAYER, 112)), owner.attend(q, codes, empty)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_host_tier_equals_its_float32_conversion(dtype):
    # views of a bf16/fp16 host tier: the worker keeps a float32 copy, rows [0, hi) converted
    # at the build, rows offloaded later (written to the tier after it) as attention reaches
    # them; all equals a worker reading the float32 conversion of the same tier in place
    keys, values = (x.to(dtype) for x in _host())
    keys[:, 96:], values[:, 96:] = 0, 0  # not offloaded yet
    later = [x.to(dtype) for x in _host(seed=9)]
    f_keys, f_values = keys.float(), values.float()
    half, r = _worker(4, 8)
    full, _ = _worker(4, 8)
    half.build(_tier(0, LAYER, keys, values, 16, 96))
    full.build(_tier(0, LAYER, f_keys, f_values, 16, 96))
    a, b = half.state[(0, LAYER)], full.state[(0, LAYER)]
    assert a.keys.dtype == np.float32 and (a.keys[:, 96:] == 0).all()  # converted up to hi only
    for x, y in [(a.mean, b.mean), (a.norms, b.norms), (a.tables.ids, b.tables.ids),
                 (a.tables.offsets, b.tables.offsets)]:
        assert np.array_equal(x, y)
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(4))
    codes = simhash_reference(q, r, 4, 8).to(torch.int32)
    done = 96
    for hi in (96, 104, 112, 128):  # pages offloaded while decoding, then two at once
        for tier, f_tier, new in [(keys, f_keys, later[0]), (values, f_values, later[1])]:
            tier[:, done:hi] = new[:, done:hi]
            f_tier[:, done:hi] = new[:, done:hi].float()
        done = hi
        for want, got in zip(full.attend(q, codes, _at(0, LAYER, hi)), half.attend(q, codes, _at(0, LAYER, hi))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert np.array_equal(a.keys[:, :128], f_keys[:, :128].numpy())
    assert np.array_equal(a.values[:, :128], f_values[:, :128].numpy())
    assert half.key_counts() == full.key_counts() and half.key_counts()[0] > 0
    # a rebuild over new views of the same tier reuses the copy, converted already
    half.build(_tier(0, LAYER, keys[:], values[:], 16, 128))
    full.build(_tier(0, LAYER, f_keys, f_values, 16, 128))
    assert half.state[(0, LAYER)].keys is a.keys and half.sources[(0, LAYER)].converted == 128
    for want, got in zip(full.attend(q, codes, _at(0, LAYER, 128)), half.attend(q, codes, _at(0, LAYER, 128))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    half.release(0)
    assert not half.copies and not half.sources and not half.state


def test_a_float16_array_is_a_half_host_tier():
    keys, values = (x.half() for x in _host())
    tensors, r = _worker(4, 8)
    arrays, _ = _worker(4, 8)
    tensors.build(_tier(0, LAYER, keys, values, 16, 96))
    arrays.build(_tier(0, LAYER, keys.numpy(), values.numpy(), 16, 96))
    q = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(4))
    codes = simhash_reference(q, r, 4, 8).to(torch.int32)
    for want, got in zip(tensors.attend(q, codes, _at(0, LAYER, 112)), arrays.attend(q, codes, _at(0, LAYER, 112))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
