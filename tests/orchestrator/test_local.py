"""The local backend: calls run on a thread pool (concurrently with each other and with the
submitting thread), one numba thread per pool thread, builds ordered before attends,
release after pending builds."""

import threading

import numba
import numpy as np
import pytest
import torch

from hetero.backend import LSHSpec
from orchestrator.local import LocalBackend
from orchestrator.lsh_worker import LSHWorker
from tests.orchestrator import attend_one

HKV, G, CAP, D, K, L = 2, 2, 96, 8, 0, 2


def _spec(layers=(2, 3)):
    return LSHSpec(K, L, D**-0.5, {layer: np.zeros((D, K * L), np.float32) for layer in layers})


def _host():
    return torch.randn(HKV, CAP, D), torch.randn(HKV, CAP, D)


@pytest.fixture
def backend():
    b = LocalBackend(n_threads=2)
    yield b
    b.close()


def test_two_calls_run_concurrently_and_the_submitter_goes_on(backend, monkeypatch):
    backend.start_lsh(_spec())
    both = threading.Barrier(2, timeout=30)  # broken (an error) unless both calls wait at once
    submitted = threading.Event()

    def attend(self, seq_id, layer, q, q_codes, hi=None):
        assert submitted.wait(30), "the submitting thread was blocked by its own call"
        both.wait()
        return torch.full((1,), float(layer)), torch.tensor(float(seq_id))

    monkeypatch.setattr(LSHWorker, "attend", attend)
    # two layers of one sequence, and one layer of two sequences (a batch)
    q, codes = torch.zeros(2, HKV * G, D), torch.zeros(2, HKV * G, L)
    for calls in ([(2, [0]), (3, [0])], [(2, [0, 5])]):
        both.reset()
        submitted.clear()
        futures = [backend.submit_attend(layer, seqs, q, codes, [0] * len(seqs)) for layer, seqs in calls]
        submitted.set()
        got = [f.result(timeout=60) for f in futures]
        assert [(out.flatten().tolist(), lse.tolist()) for out, lse in got] == \
               [([layer] * len(seqs), seqs) for layer, seqs in calls]


def test_pool_threads_run_numba_with_one_thread(backend):
    assert backend.pool.submit(numba.get_num_threads).result() == 1
    assert backend.build_pool.submit(numba.get_num_threads).result() == 1


def test_attend_follows_build_and_release_frees(backend):
    backend.start_lsh(_spec())
    k, v = _host()
    for layer in (2, 3):
        backend.submit_build(7, layer, k, v, 16, 64)
    q = torch.randn(HKV * G, D)
    out, lse = attend_one(backend, 7, 3, q, torch.zeros(HKV * G, L, dtype=torch.int32), 80)
    assert out.shape == (HKV * G, D) and torch.isfinite(lse).all()
    assert backend.key_counts() == (HKV * G * 64, HKV * G * 64)  # K=0: every key is read
    sizes = backend.table_bytes(7)
    assert set(sizes) == {2, 3} and all(n > 0 for n in sizes.values())
    backend.release(7)
    assert backend.table_bytes() == {2: 0, 3: 0}


def test_layers_are_sharded_over_workers(backend):
    backend.start_lsh(_spec(layers=(2, 3, 4)))
    assert sorted(w.layers for w in backend._workers) == [[2, 4], [3]]
    with pytest.raises(ValueError, match="no worker serves layer 5"):
        backend.submit_build(0, 5, *_host(), 0, 8)


def test_a_failed_build_surfaces_at_attend(backend):
    backend.start_lsh(_spec())
    k, v = _host()
    backend.submit_build(0, 2, k.double(), v.double(), 16, 64)
    with pytest.raises(TypeError, match="float32"):
        attend_one(backend, 0, 2, torch.zeros(HKV * G, D), torch.zeros(HKV * G, L, dtype=torch.int32), 64)


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_bad_pool_size(n):
    with pytest.raises(ValueError, match="n_threads"):
        LocalBackend(n_threads=n)


def test_attend_does_not_queue_behind_a_build(monkeypatch):
    backend = LocalBackend(n_threads=1)  # one thread per pool: a shared pool would deadlock
    backend.start_lsh(_spec())
    k, v = _host()
    backend.submit_build(0, 3, k, v, 16, 64).result()
    release = threading.Event()
    real_build = LSHWorker.build
    monkeypatch.setattr(LSHWorker, "build", lambda self, *a: release.wait(30) and real_build(self, *a))
    try:
        backend.submit_build(0, 2, k, v, 16, 64)  # held until `release`
        codes = torch.zeros(HKV * G, L, dtype=torch.int32)
        out, _ = attend_one(backend, 0, 3, torch.randn(HKV * G, D), codes, 64)
        assert out.shape == (HKV * G, D)
    finally:
        release.set()
        backend.close()
