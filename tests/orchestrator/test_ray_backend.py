"""The ray backend with real actors on a local Ray instance started once for the module:
generic tasks of any worker class, each host-tier row sent once per actor (again only to a
group that cannot have it yet), ``ready`` waited for before sending; MagicPIG's protocol over
it: results equal the local backend's on the same host tier (the oracle) as the host tier
grows (bfloat16 rows converted by the driver), attention does not queue behind a build, a
killed or silent actor fails the call with a named error and is replaced on the next call,
its sequences' calls failing until they are released; end to end, greedy tokens equal the
local backend's, and a killed actor fails the request, frees its pages and leaves the LLM
usable and closable."""

import time

import numpy as np
import pytest
import ray
import torch

from hetero import LLM, SamplingParams
from hetero.backend import HostRows, HostTier, WorkerError, WorkerSpec
from hetero.policies.lsh_protocol import LSHClient, LSHSpec
from orchestrator.local import LocalBackend
from orchestrator.ray_backend import RayBackend, _send
from tests.orchestrator import attend_one

HKV, G, CAP, D, K, L = 2, 2, 128, 8, 0, 2
CODES = torch.zeros(HKV * G, L, dtype=torch.int32)


def _spec(layers=(2, 3), k=K, l=L, d=D):
    rng = np.random.default_rng(0)
    return LSHSpec(k, l, d**-0.5, {layer: rng.standard_normal((d, k * l), dtype=np.float32) for layer in layers})


@pytest.fixture(scope="module")
def driver():
    """The module's Ray instance, started by a RayBackend as LLM(backend="ray") starts it."""
    assert not ray.is_initialized()
    b = RayBackend()
    yield b
    b.close()
    assert not ray.is_initialized()  # it started Ray, so closing it shut Ray down


@pytest.fixture
def backend(driver):
    b = RayBackend(n_workers=2, timeout_s=60)  # joins the module's instance
    yield b
    b.close()


def test_local_instance_listens_on_loopback_only(driver):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    assert driver.describe().startswith("ray (1 node(s)")


def test_backends_share_the_instance_until_the_last_closes(driver):
    other = RayBackend()
    other.close()
    assert ray.is_initialized()  # the driver still uses it


def _toy_class():
    """A worker class defined in a function, so that Ray ships it by value: its tasks say
    what they received."""

    class Toy:
        def __init__(self, per_layer, tag):
            self.per_layer, self.tag = per_layer, tag

        def got(self, *args):
            return [self.got(*a) if isinstance(a, list)
                    else (a.first, a.stop, a.keys.shape[1], float(a.keys.sum())) if isinstance(a, HostRows)
                    else type(a).__name__ for a in args]

        def layers(self):
            return self.tag, sorted(self.per_layer)

        def release(self, seq_id):
            pass

    return Toy


def test_generic_tasks_and_rows_sent_once(backend):
    backend.start(WorkerSpec(_toy_class(), {2: None, 3: None, 4: None}, ("t",)))
    assert sorted(backend.call_all("layers")) == [("t", [2, 4]), ("t", [3])]
    k = torch.arange(CAP, dtype=torch.float32)[None, :, None].expand(HKV, CAP, D).contiguous()
    tier = lambda stop, layer=2: HostTier(0, layer, k, k, 16, stop)  # noqa: E731
    # the first call sends [16, 64); the next of its group only the rows since
    assert backend.submit(2, "got", tier(64), background=True).result() == [(16, 64, 48, HKV * D * sum(range(16, 64)))]
    assert backend.submit(2, "got", tier(80), background=True).result()[0][:3] == (64, 80, 16)
    # the other group: everything the calls seen to finish sent is there, the rest goes
    fg = backend.submit(2, "got", tier(96), torch.ones(2), [tier(96, 4)]).result()
    assert fg[0][:3] == (80, 96, 16) and fg[1] == "ndarray" and fg[2][0][:3] == (16, 96, 80)
    late = backend.submit(2, "got", tier(96), background=True)  # nothing new: an empty block
    assert late.result() == [(96, 96, 0, 0.0)]
    # a released sequence starts over
    backend.release(0)
    assert backend.submit(2, "got", tier(32)).result()[0][:3] == (16, 32, 16)
    with pytest.raises(ValueError, match="HostTier of layer 3 goes to the worker of layer 2"):
        backend.submit(2, "got", tier(32, layer=3))


def test_ready_is_waited_for_before_sending(backend):
    backend.start(WorkerSpec(_toy_class(), {2: None}, ("t",)))
    k = torch.zeros(HKV, CAP, D)
    waited = []

    class Copies:
        def wait(self):  # the copy lands as it is waited for
            k[:, 16:32] = 1
            waited.append(True)

    got = backend.submit(2, "got", HostTier(0, 2, k, k, 16, 32), ready=Copies()).result()
    assert waited == [True] and got == [(16, 32, 16, HKV * 16 * D)]


def test_results_equal_the_local_backend_as_the_host_tier_grows(backend):
    # the decode loop's pattern for a batch of two sequences: tables over [16, 64), pages
    # offloaded one by one (each written to the host tier after the build), a rebuild of
    # one sequence, more pages; one call per layer and step for the batch
    hosts, truths = {}, {}
    for seq in (0, 1):
        k, v = torch.randn(HKV, CAP, D), torch.randn(HKV, CAP, D)
        k[:, 64:], v[:, 64:] = 0, 0  # not offloaded yet
        hosts[seq], truths[seq] = (k, v), (torch.randn(HKV, CAP, D), torch.randn(HKV, CAP, D))
    local = LocalBackend(n_threads=2)
    clients = [LSHClient(local, _spec()), LSHClient(backend, _spec())]
    try:
        for c in clients:
            for seq, layer in [(s, layer) for s in (0, 1) for layer in (2, 3)]:
                c.build(seq, layer, *hosts[seq], 16, 64)
        steps = [(80, None), (96, 96), (112, None), (128, None)]  # (hi, rebuild of seq 1 up to)
        for hi, rebuild in steps:
            for seq in (0, 1):
                (k, v), (tk, tv) = hosts[seq], truths[seq]
                k[:, hi - 16:hi], v[:, hi - 16:hi] = tk[:, hi - 16:hi], tv[:, hi - 16:hi]
            for layer in (2, 3):
                if rebuild:  # waited for: both attend over the new tables
                    for c in clients:
                        c.build(1, layer, *hosts[1], 16, rebuild).result()
                q = torch.randn(2, HKV * G, D)
                codes = torch.stack([CODES, CODES])
                want, got = (c.attend(layer, [0, 1], q, codes, [hi, hi]).result() for c in clients)
                assert got[0].shape == (2, HKV * G, D) and got[1].shape == (2, HKV * G)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert clients[1].key_counts() == clients[0].key_counts()
        for seq in (0, 1):
            assert clients[1].table_bytes(seq) == clients[0].table_bytes(seq) and all(clients[1].table_bytes(seq).values())
    finally:
        local.close()
    for seq in (0, 1):
        clients[1].release(seq)
    assert clients[1].table_bytes() == {2: 0, 3: 0}


def test_a_half_host_tier_is_sent_as_float32_rows(backend):
    # the driver converts the bfloat16 rows it sends; the local backend's workers convert
    # theirs: results equal, rows offloaded after the build included
    k, v = torch.randn(HKV, CAP, D).bfloat16(), torch.randn(HKV, CAP, D).bfloat16()
    rows = _send(k[:, 16:64])
    assert rows.dtype == np.float32 and np.array_equal(rows, k[:, 16:64].float().numpy())
    truth = k.clone(), v.clone()
    k[:, 64:], v[:, 64:] = 0, 0  # not offloaded yet
    local = LocalBackend(n_threads=1)
    clients = [LSHClient(local, _spec()), LSHClient(backend, _spec())]
    try:
        for c in clients:
            c.build(0, 3, k, v, 16, 64)
        for hi in (64, 80):
            k[:, hi - 16:hi], v[:, hi - 16:hi] = truth[0][:, hi - 16:hi], truth[1][:, hi - 16:hi]
            q = torch.randn(HKV * G, D)
            want, got = (attend_one(c, 0, 3, q, CODES, hi) for c in clients)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert clients[1].key_counts() == clients[0].key_counts()
    finally:
        local.close()
    clients[1].release(0)


def test_layers_are_sharded_over_actors(backend):
    lsh = LSHClient(backend, _spec(layers=(2, 3, 4)))
    assert [w.layers for w in backend.workers] == [[2, 4], [3]]
    assert "CPU worker 1 (a Ray actor serving layers 3)" == str(backend.workers[1])
    with pytest.raises(ValueError, match="no worker serves layer 5"):
        lsh.build(0, 5, torch.zeros(HKV, CAP, D), torch.zeros(HKV, CAP, D), 0, 8)
    with pytest.raises(ValueError, match="build first"):
        attend_one(lsh, 0, 2, torch.zeros(HKV * G, D), CODES, 8)


def test_a_failed_build_surfaces_at_attend(backend):
    lsh = LSHClient(backend, _spec())
    k = torch.randn(HKV, CAP, D, dtype=torch.float64)
    lsh.build(0, 2, k, k, 16, 64)
    with pytest.raises(TypeError, match="float32"):
        attend_one(lsh, 0, 2, torch.zeros(HKV * G, D), CODES, 64)


def test_attend_does_not_queue_behind_a_build(driver):
    # one actor serves both layers; a long rebuild of layer 2 is running when layer 3 attends
    b = RayBackend(n_workers=1, timeout_s=120)
    try:
        n, d, k_bits, l_tables = 200_000, 64, 8, 75
        lsh = LSHClient(b, _spec(k=k_bits, l=l_tables, d=d))
        keys, values = torch.randn(1, n, d), torch.randn(1, n, d)
        lsh.build(0, 3, keys, values, 16, 1024).result()
        lsh.build(0, 2, keys, values, 16, 1024).result()
        build = lsh.build(0, 2, keys, values, 16, n)  # ~0.5 s
        codes = torch.zeros(G, l_tables, dtype=torch.int32)
        out, _ = attend_one(lsh, 0, 3, torch.randn(G, d), codes, 1024)
        assert out.shape == (G, d) and not build.done()
        build.result()
    finally:
        b.close()


def test_a_killed_actor_fails_the_call_by_name_and_is_replaced(backend):
    lsh = LSHClient(backend, _spec())
    k, v = torch.randn(HKV, CAP, D), torch.randn(HKV, CAP, D)
    for layer in (2, 3):  # waited for: table_bytes does not queue behind builds
        lsh.build(0, layer, k, v, 16, 64).result()
    attend_one(lsh, 0, 3, torch.randn(HKV * G, D), CODES, 64)
    victim = backend.workers[1].actor
    ray.kill(victim)
    deadline = time.perf_counter() + 30
    with pytest.raises(ray.exceptions.RayActorError):  # the kill lands asynchronously
        while time.perf_counter() < deadline:
            ray.get(victim.__ray_ready__.remote(), timeout=30)
            time.sleep(0.05)
    # dead now, and the backend does not know yet
    t = time.perf_counter()
    with pytest.raises(WorkerError, match=r"CPU worker 1 \(a Ray actor serving layers 3\) died during "
                                          r"attend_batch of layer 3 \(sequence 0\)"):
        attend_one(lsh, 0, 3, torch.randn(HKV * G, D), CODES, 64)
    assert time.perf_counter() - t < 30 and backend.workers[1].dead
    sizes = lsh.table_bytes(0)  # read as a failed request is cleaned up: no raise
    assert sizes[2] > 0 and sizes[3] == 0
    # the next call gets a new actor, which cannot serve the sequence whose rows died
    with pytest.raises(WorkerError, match=r"CPU worker 1 \(.*\) died earlier, and the rows of sequence 0"):
        attend_one(lsh, 0, 3, torch.randn(HKV * G, D), CODES, 64)
    assert not backend.workers[1].dead
    lsh.release(0)
    assert lsh.table_bytes() == {2: 0, 3: 0}
    lsh.build(1, 3, k, v, 16, 64)  # a new request on the new actor
    out, lse = attend_one(lsh, 1, 3, torch.randn(HKV * G, D), CODES, 80)
    assert torch.isfinite(lse).all() and not backend.workers[1].dead
    lsh.build(0, 3, k, v, 16, 64)  # a released sequence id may come back
    assert torch.isfinite(attend_one(lsh, 0, 3, torch.randn(HKV * G, D), CODES, 64)[1]).all()


def test_a_silent_actor_times_out_and_is_killed(driver):
    b = RayBackend(n_workers=1)
    try:
        lsh = LSHClient(b, _spec(layers=(2,), k=8, l=75, d=64))
        b.timeout_s = 0.05
        keys = torch.randn(1, 200_000, 64)
        t = time.perf_counter()
        with pytest.raises(WorkerError, match=r"CPU worker 0 .* did not answer build of layer 2 "
                                              r"\(sequence 0\) within 0.05 s"):
            lsh.build(0, 2, keys, keys, 16, 200_000).result()
        assert time.perf_counter() - t < 10 and b.workers[0].dead
    finally:
        b.close()


def test_the_instance_gcs_address_passes_the_probe(driver):
    # a real GCS answers the probe (the bad addresses: test_ray_address.py); the backend
    # then shares the module's instance
    other = RayBackend(ray.get_runtime_context().gcs_address)
    other.close()
    assert ray.is_initialized()


# -- end to end --------------------------------------------------------------------------

PROMPT = open("/usr/share/common-licenses/GPL-3").read()[:6500]  # ~1.5k tokens
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
EMBEDDED = {"magicpig": {}, "quest": {"token_budget": 128, "n_local": 32}}


@pytest.mark.parametrize("policy", ["magicpig", "quest"])
def test_greedy_tokens_equal_the_local_backend(driver, policy):
    # rebuilds (after 512 new tokens) do not happen here: they run in the background, so
    # which tables a step samples depends on timing in either backend
    outs = {}
    for backend in ("local", "ray"):
        with LLM(device="cpu", policy=policy, policy_params=EMBEDDED[policy], device_kv_budget="128MiB",
                 prefill_chunk=512, backend=backend) as llm:
            (outs[backend],) = llm.generate(PROMPT, GREEDY)
            assert llm.store.allocator.n_used == 0
    assert outs["ray"].stats.prompt_tokens > 1200
    assert outs["ray"].token_ids == outs["local"].token_ids
    assert outs["ray"].stats.policy == outs["local"].stats.policy
    assert (outs["ray"].stats.policy.get("lsh_table_bytes", 0) > 0) == (policy == "magicpig")


def _tiny(path, backend):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=32, policy="magicpig", backend=backend,
               policy_params={"lsh_k": 4, "lsh_l": 8, "n_local": 16, "dense_layers": 0},
               device_kv_budget="8MiB")


def test_a_killed_actor_fails_the_request_and_the_llm_goes_on(driver, tiny_model_dir):
    ids = list(range(300, 600))
    with _tiny(tiny_model_dir, "local") as llm:
        (want,) = llm.generate(ids, GREEDY)
    llm = _tiny(tiny_model_dir, "ray")
    default_timeout, llm.backend.timeout_s = llm.backend.timeout_s, 20
    victim = llm.backend.workers[1]
    calls = []
    submit = llm.backend.submit

    def kill_on_the_fifth_call(layer, task, *args, **kwargs):
        calls.append(task)
        if calls.count("attend_batch") == 5:
            ray.kill(victim.actor)
        return submit(layer, task, *args, **kwargs)

    llm.backend.submit = kill_on_the_fifth_call
    t = time.perf_counter()
    with pytest.raises(WorkerError, match=r"CPU worker 1 \(a Ray actor serving layers 1\) died"):
        llm.generate(ids, GREEDY)
    assert time.perf_counter() - t < 60
    assert llm.store.allocator.n_used == 0 and not llm.store.tables  # pages released
    # worker 1 is replaced: a new actor's first answer waits for its process to start
    llm.backend.timeout_s = default_timeout
    (again,) = llm.generate(ids, GREEDY)
    assert again.token_ids == want.token_ids
    llm.close()
    assert not llm.backend.workers
