"""The local backend: tasks run on thread pools (concurrently with each other and with the
submitting thread, which never waits for a task's ``ready``), one numba thread per pool
thread, background tasks apart, release after pending background tasks; and MagicPIG's
protocol over it: a batch split over the pool, attends after builds, a failed build
surfacing at attend, attention not queued behind a build."""

import threading
import time

import numba
import numpy as np
import pytest
import torch

from hetero.backend import HostTier, WorkerSpec
from hetero.policies.lsh_protocol import LSHClient, LSHSpec
from orchestrator.local import LocalBackend
from orchestrator.lsh_worker import LSHWorker
from tests.orchestrator import attend_one

HKV, G, CAP, D, K, L = 2, 2, 96, 8, 0, 2


def _spec(layers=(2, 3)):
    return LSHSpec(K, L, D**-0.5, {layer: np.zeros((D, K * L), np.float32) for layer in layers})


def _host():
    return torch.randn(HKV, CAP, D), torch.randn(HKV, CAP, D)


class Toy:
    """A worker of the generic interface: its shard's data, tasks that record their calls."""

    def __init__(self, per_layer, tag, scale=1):
        self.per_layer, self.tag, self.scale = per_layer, tag, scale
        self.calls = []

    def echo(self, x):
        self.calls.append(("echo", x))
        return (self.tag, sorted(self.per_layer), x * self.scale)

    def slow(self, seconds):
        time.sleep(seconds)
        self.calls.append(("slow", seconds))

    def fail(self):
        raise KeyError("toy failure")

    def release(self, seq_id):
        self.calls.append(("release", seq_id))


@pytest.fixture
def backend():
    b = LocalBackend(n_threads=2)
    yield b
    b.close()


# -- the generic interface ------------------------------------------------------------------


def test_workers_are_made_from_the_spec_and_sharded_by_layer(backend):
    backend.start(WorkerSpec(Toy, {2: "a", 3: "b", 4: "c"}, ("t",), {"scale": 10}))
    assert sorted(sorted(w.per_layer.items()) for w in backend.workers) == [[(2, "a"), (4, "c")], [(3, "b")]]
    assert backend.submit(4, "echo", 5).result(10) == ("t", [2, 4], 50)
    assert backend.submit(3, "echo", 1, background=True).result(10) == ("t", [3], 10)
    with pytest.raises(ValueError, match="no worker serves layer 5"):
        backend.submit(5, "echo", 1)
    with pytest.raises(KeyError, match="toy failure"):  # a task's own error, at result
        backend.submit(2, "fail").result(10)
    assert sorted(backend.call_all("echo", 1)) == [("t", [2, 4], 10), ("t", [3], 10)]


def test_a_worker_class_by_path_is_imported():
    assert WorkerSpec("orchestrator.lsh_worker:LSHWorker", {}).worker_class() is LSHWorker
    with pytest.raises(ValueError, match="module:Class"):
        WorkerSpec("orchestrator.lsh_worker.LSHWorker", {}).worker_class()


def test_two_tasks_run_concurrently_and_the_submitter_goes_on(backend, monkeypatch):
    backend.start(WorkerSpec(Toy, {2: None, 3: None}, ("t",)))
    both = threading.Barrier(2, timeout=30)  # broken (an error) unless both tasks wait at once
    submitted = threading.Event()

    def meet(self, x):
        assert submitted.wait(30), "the submitting thread was blocked by its own task"
        both.wait()
        return x

    monkeypatch.setattr(Toy, "echo", meet)
    futures = [backend.submit(layer, "echo", layer) for layer in (2, 3)]
    submitted.set()
    assert [f.result(timeout=60) for f in futures] == [2, 3]


def test_ready_is_waited_for_on_the_pool_not_by_the_submitter(backend):
    backend.start(WorkerSpec(Toy, {2: None}, ("t",)))
    landed = threading.Event()

    class Copies:
        def wait(self):
            assert landed.wait(30)

    future = backend.submit(2, "echo", 1, ready=Copies())  # returns although nothing landed
    time.sleep(0.05)
    assert not future.done()
    landed.set()
    assert future.result(30) == ("t", [2], 1)


def test_release_waits_for_pending_background_tasks(backend):
    backend.start(WorkerSpec(Toy, {2: None}, ("t",)))
    backend.submit(2, "slow", 0.3, background=True)
    backend.release(7)
    assert backend.workers[0].calls == [("slow", 0.3), ("release", 7)]


def test_a_failing_bookkeeping_call_is_left_out(backend, caplog):
    backend.start(WorkerSpec(Toy, {2: None, 3: None}, ("t",)))
    assert backend.call_all("fail") == []
    assert "toy failure" in caplog.text


def test_pool_threads_run_numba_with_one_thread(backend):
    assert backend.pool.submit(numba.get_num_threads).result() == 1
    assert backend.build_pool.submit(numba.get_num_threads).result() == 1


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_bad_pool_size(n):
    with pytest.raises(ValueError, match="n_threads"):
        LocalBackend(n_threads=n)


# -- MagicPIG's protocol over it --------------------------------------------------------------


def test_a_batch_is_split_over_the_pool(backend, monkeypatch):
    lsh = LSHClient(backend, _spec())
    k, v = _host()
    for seq in (0, 5):
        lsh.build(seq, 2, k, v, 16, 64).result()
    both = threading.Barrier(2, timeout=30)

    def attend(self, q, q_codes, host):
        assert isinstance(host, HostTier) and host.keys is k  # by reference
        both.wait()
        return torch.full((1,), float(host.layer)), torch.tensor(float(host.seq_id))

    monkeypatch.setattr(LSHWorker, "attend", attend)
    q, codes = torch.zeros(2, HKV * G, D), torch.zeros(2, HKV * G, L)
    out, lse = lsh.attend(2, [0, 5], q, codes, [64, 64]).result(timeout=60)
    assert out.flatten().tolist() == [2, 2] and lse.tolist() == [0, 5]


def test_attend_follows_build_and_release_frees(backend):
    lsh = LSHClient(backend, _spec())
    k, v = _host()
    for layer in (2, 3):
        lsh.build(7, layer, k, v, 16, 64)
    q = torch.randn(HKV * G, D)
    out, lse = attend_one(lsh, 7, 3, q, torch.zeros(HKV * G, L, dtype=torch.int32), 80)
    assert out.shape == (HKV * G, D) and torch.isfinite(lse).all()
    assert lsh.key_counts() == (HKV * G * 64, HKV * G * 64)  # K=0: every key is read
    sizes = lsh.table_bytes(7)
    assert set(sizes) == {2, 3} and all(n > 0 for n in sizes.values())
    lsh.release(7)
    assert lsh.table_bytes() == {2: 0, 3: 0}


def test_layers_are_sharded_over_workers(backend):
    lsh = LSHClient(backend, _spec(layers=(2, 3, 4)))
    assert sorted(w.layers for w in backend.workers) == [[2, 4], [3]]
    with pytest.raises(ValueError, match="no worker serves layer 5"):
        lsh.build(0, 5, *_host(), 0, 8)
    with pytest.raises(ValueError, match="no LSH tables for sequence 0, layer 2: build first"):
        attend_one(lsh, 0, 2, torch.zeros(HKV * G, D), torch.zeros(HKV * G, L, dtype=torch.int32), 8)


def test_a_failed_build_surfaces_at_attend(backend):
    lsh = LSHClient(backend, _spec())
    k, v = _host()
    lsh.build(0, 2, k.double(), v.double(), 16, 64)
    with pytest.raises(TypeError, match="float32"):
        attend_one(lsh, 0, 2, torch.zeros(HKV * G, D), torch.zeros(HKV * G, L, dtype=torch.int32), 64)


def test_attend_does_not_queue_behind_a_build(monkeypatch):
    backend = LocalBackend(n_threads=1)  # one thread per pool: a shared pool would deadlock
    lsh = LSHClient(backend, _spec())
    k, v = _host()
    lsh.build(0, 3, k, v, 16, 64).result()
    release = threading.Event()
    real_build = LSHWorker.build
    monkeypatch.setattr(LSHWorker, "build", lambda self, *a: release.wait(30) and real_build(self, *a))
    try:
        lsh.build(0, 2, k, v, 16, 64)  # held until `release`
        codes = torch.zeros(HKV * G, L, dtype=torch.int32)
        out, _ = attend_one(lsh, 0, 3, torch.randn(HKV * G, D), codes, 64)
        assert out.shape == (HKV * G, D)
    finally:
        release.set()
        backend.close()
