"""The chain prefill (KV-Runahead) over local processes: its KV and logits against one exact
causal pass in this process, for 1, 2 and 3 workers and fitted, even and uneven parts; the
backend interface; the cost model's calibration and cache; a worker that dies (killed
mid-prefill, or while idle) or cannot start fails the launcher within seconds, naming it,
and leaves no process behind."""

import os
import signal
import time

import psutil
import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.backend import ChainResult
from hetero.kvcache import KVCache, config_hash
from orchestrator.calibrate import cost_model, model_config, plan_bounds
from orchestrator.chain import Chain, ChainError, threads_per_worker
from orchestrator.chain_part import load_model
from orchestrator.local import LocalBackend
from tests.oracle import attention_oracle

N_TOKENS = 300
# float32 KV against the float64 oracle's pass: the chain merges each part's attention over
# earlier keys with its own by LSE, the oracle takes one softmax; measured max difference
# ~1e-6 on values of O(1)
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``(ids, k, v, logits)``: one exact causal pass over the whole prompt in this process
    (the float64 oracle), the keys recorded after RoPE."""
    net = load_model(tiny_model_dir, torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, net.cfg.vocab_size, (N_TOKENS,), generator=gen).tolist()
    pos = torch.arange(N_TOKENS)
    ks, vs = [], []

    def attend(layer, q, k, v):
        ks.append(k.clone())
        vs.append(v.clone())
        return attention_oracle(q, k, v, pos, pos, q.shape[-1] ** -0.5)[0].to(q.dtype)

    with torch.inference_mode():
        hidden = net(torch.tensor(ids), pos, attend)
        logits = net.logits(hidden[-1:])[0]
    return ids, ks, vs, logits


def _check(result: ChainResult, reference, workers: int):
    ids, ks, vs, logits = reference
    assert result.token_ids == ids and result.workers == workers and len(result.k) == len(ks)
    for layer, (k, v) in enumerate(zip(ks, vs)):
        assert result.k[layer].shape == k.shape and result.k[layer].dtype == torch.float32
        torch.testing.assert_close(result.k[layer], k, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result.v[layer], v, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(result.logits, logits, atol=ATOL * 10, rtol=RTOL)
    assert result.first_token == int(logits.argmax())
    assert len(result.busy_s) == len(result.wait_s) == workers
    assert all(b > 0 for b in result.busy_s) and all(w >= 0 for w in result.wait_s)
    assert 0 < result.ttft_s and result.kv_s >= 0


def test_one_and_three_workers_give_the_exact_kv_and_first_token(tiny_model_dir, reference):
    ids = reference[0]
    events = []
    with Chain(tiny_model_dir, torch.float32, workers=1) as one:
        _check(one.prefill(ids, [0, N_TOKENS]), reference, 1)
    with Chain(tiny_model_dir, torch.float32, workers=3, timeout_s=30) as chain:
        assert chain.startup_s > 0 and chain.n_layers == 2
        for bounds in ([0, 150, 250, 300], [0, 1, 2, 300], [0, 298, 299, 300], [0, 100, 200, 300]):
            _check(chain.prefill(ids, bounds, progress=lambda *e: events.append(e)), reference, 3)
        # the chain serves another prompt, shorter, without a restart
        short = chain.prefill(ids[:40], [0, 20, 32, 40])
        assert short.k[0].shape[0] == 40
        torch.testing.assert_close(short.k[1], reference[1][1][:40], atol=ATOL, rtol=RTOL)
    assert {(w, n) for w, n, _ in events} == {(w, n) for w in range(3) for n in (1, 2)}
    with LLM(tiny_model_dir, device="cpu") as llm:  # the engine's greedy first token
        (out,) = llm.generate(ids, SamplingParams(max_new_tokens=1))
    assert out.token_ids[0] == int(reference[3].argmax())


def test_the_backend_chains_two_workers_on_fitted_parts(tiny_model_dir, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    seen = []
    result = LocalBackend(1).chain_prefill(tiny_model_dir, torch.float32, reference[0], 2,
                                           progress=lambda *e: seen.append(e))
    _check(result, reference, 2)
    assert result.partition == "fitted" and result.startup_s > 0 and seen[-1][1:] == (2, 2)
    cfg = model_config(tiny_model_dir)
    assert result.bounds == plan_bounds(cfg, torch.float32, N_TOKENS, 2, "fitted", threads_per_worker(2))
    assert result.bounds[1] >= N_TOKENS // 2  # the second part sees more keys: it is the shorter
    kv = result.kv_cache("tiny", config_hash(cfg), 16)
    assert isinstance(kv, KVCache) and kv.n_tokens == N_TOKENS and kv.n_layers == 2


def test_the_cost_model_is_measured_once_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    cfg = model_config(tiny_model_dir)
    fit = cost_model(cfg, torch.float32, 1)
    (cached,) = (tmp_path / "runahead").iterdir()
    assert config_hash(cfg) in cached.name and cached.name.endswith("-float32-cpu-t1.json")
    assert fit.a > 0 and fit.b >= 0
    assert cost_model(cfg, torch.float32, 1) == fit  # read back, not measured again
    assert plan_bounds(cfg, torch.float32, 10, 2, "even", 1) == [0, 5, 10]
    with pytest.raises(ValueError, match="partition must be one of 'fitted', 'even'"):
        plan_bounds(cfg, torch.float32, 10, 2, "random", 1)


def _gone(pids) -> bool:
    """No process of ``pids`` runs (reaped, or at most a zombie)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_a_worker_killed_mid_prefill_fails_the_launcher_naming_it(tiny_model_dir, reference):
    chain = Chain(tiny_model_dir, torch.float32, workers=3, timeout_s=30)
    with chain:
        pids = chain.pids
        os.kill(pids[1], signal.SIGSTOP)  # worker 1 holds the chain at its first layer...

        def kill_worker_1(worker, layers, n_layers):  # ...and dies once worker 0 is under way
            if psutil.pid_exists(pids[1]):
                os.kill(pids[1], signal.SIGKILL)

        t0 = time.monotonic()
        with pytest.raises(ChainError, match=rf"worker 1 \(pid {pids[1]}, prompt tokens 100:200\) "
                                             r"died \(killed by SIGKILL\)"):
            chain.prefill(reference[0], [0, 100, 200, 300], progress=kill_worker_1)
        assert time.monotonic() - t0 < 30
        assert _gone(pids)
        with pytest.raises(RuntimeError, match="not running"):
            chain.prefill(reference[0], [0, 100, 200, 300])
    assert _gone(pids)


def test_a_worker_dead_before_the_prompt_fails_it_and_a_bad_model_fails_the_start(tiny_model_dir, tmp_path):
    with Chain(tiny_model_dir, torch.float32, workers=2, timeout_s=30) as chain:
        pids = chain.pids
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(ChainError, match=r"worker 1 \(pid \d+, prompt tokens 7:10\) died"):
            chain.prefill(list(range(10)), [0, 7, 10])
    assert _gone(pids)
    chain = Chain(str(tmp_path / "no-model"), torch.float32, workers=2)
    with pytest.raises(ChainError, match=r"while starting: .*worker 0 \(pid \d+\) failed: ValueError: .*no-model"):
        chain.start()
    assert _gone(chain.pids)


def test_bad_arguments_are_refused_before_a_worker_starts(tiny_model_dir):
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        Chain(tiny_model_dir, workers=0)
    backend = LocalBackend(1)
    with pytest.raises(ValueError, match="cannot be split over 4 workers"):
        backend.chain_prefill(tiny_model_dir, torch.float32, [1, 2, 3], 4)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        backend.chain_prefill(tiny_model_dir, "float32", [1, 2, 3], 2)
    with pytest.raises(ValueError, match="bounds must be 3 increasing integers"):
        Chain(tiny_model_dir, workers=2).prefill([1, 2, 3], [0, 3, 3])
