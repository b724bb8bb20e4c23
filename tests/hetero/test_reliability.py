"""A request's pages are freed on every exit (errors of any type, Ctrl-C, a stream dropped or
closed), everything about a request is checked before a page is taken, a closed LLM refuses
work, and a soak of mixed requests leaves the store as it found it."""

import gc
import random
import time

import numpy as np
import pytest

import hetero.scheduler
from hetero import LLM, SamplingParams

TEXT = open("/usr/share/common-licenses/Apache-2.0").read()[:3000]
SHORT = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=32, device_kv_budget="2MiB")


def _empty(llm) -> bool:
    return not llm.store.tables and llm.store.allocator.n_free == llm.store.allocator.n_pages


def _fail_on(obj, name, call, exc):
    """Make ``obj.name`` raise ``exc`` on its ``call``-th call (1-based)."""
    real, n = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        n[0] += 1
        if n[0] == call:
            raise exc
        return real(*args, **kwargs)

    setattr(obj, name, wrapper)


@pytest.mark.parametrize("seed", [2**70, -1, "abc", True, 1.5])
def test_bad_seeds_are_refused_before_anything_runs(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "1"}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("x"), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_request_that_fails_anywhere_frees_its_pages(llm, monkeypatch, exc, where):
    _fail_on(llm.engine, where, 2, exc)
    with pytest.raises(type(exc)):
        # a batch of three: the failure comes in the second prefill or decode step, when
        # the first request may already be finished
        llm.generate([TEXT[:200], TEXT[:400], TEXT[:100]],
                     SamplingParams(max_new_tokens=1 if where == "prefill" else 6, ignore_eos=True))
    monkeypatch.undo()
    assert _empty(llm)
    assert len(llm.generate(TEXT[:200], SHORT)[0].token_ids) == 4  # usable afterwards


def test_admission_that_fails_on_the_second_prompt_frees_the_first(llm, monkeypatch):
    _fail_on(llm.store, "admit", 2, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        llm.generate([TEXT[:200], TEXT[:300]], SHORT)
    monkeypatch.undo()
    assert _empty(llm)


def test_a_failing_generator_is_made_before_any_page(llm, monkeypatch):
    def broken(*args):
        raise RuntimeError("no generator")

    monkeypatch.setattr(hetero.scheduler, "make_generator", broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            llm.generate("Hello", SamplingParams(temperature=1.0, seed=1))
        assert _empty(llm)


@pytest.mark.parametrize("end", ["del", "close", "exhaust", "error"])
def test_a_stream_frees_its_pages_however_it_ends(llm, monkeypatch, end):
    g = llm.stream(TEXT[:300], SamplingParams(max_new_tokens=8 if end != "del" else 1, ignore_eos=True))
    next(g)
    assert llm.store.tables
    if end == "del":  # dropped after its last token
        del g
        gc.collect()
    elif end == "close":
        g.close()
    elif end == "exhaust":
        list(g)
    else:
        _fail_on(llm.engine, "decode", 2, RuntimeError("boom"))
        with pytest.raises(RuntimeError):
            list(g)
        monkeypatch.undo()
    assert _empty(llm)


def test_a_closed_llm_refuses_work_at_once(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", device_kv_budget="2MiB")
    llm.generate("Hello", SHORT)
    llm.close()
    llm.close()  # idempotent
    for call in (lambda: llm.generate("Hello", SHORT), lambda: next(llm.stream("Hello", SHORT)),
                 lambda: llm.logprobs("Hello there")):
        with pytest.raises(ValueError, match="closed"):
            call()


@pytest.mark.parametrize("prompts, error, match", [
    (True, TypeError, "prompts must be"),
    (np.array([1, 2, 3]), TypeError, "prompts must be"),
    ([True, False], ValueError, "a prompt must be"),
    ([[1, 2], None], ValueError, "a prompt must be"),
    ([b"bytes"], ValueError, "a prompt must be"),
])
def test_bad_prompts_are_clear_errors(llm, prompts, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, SHORT)
    assert _empty(llm)


def test_numpy_token_ids_are_token_ids(llm):
    ids = [int(t) for t in llm.tokenizer("Hello there")["input_ids"]]
    a = llm.generate(list(np.array(ids)), SHORT)[0].token_ids
    assert a == llm.generate(ids, SHORT)[0].token_ids


def test_a_huge_prompt_is_refused_without_tokenising_it_whole(tiny_model_dir, monkeypatch):
    llm = LLM(tiny_model_dir, device="cpu", max_model_len=256, device_kv_budget="2MiB")
    lengths = []
    tokenize = type(llm.tokenizer).__call__
    monkeypatch.setattr(type(llm.tokenizer), "__call__",
                        lambda self, text, **kw: lengths.append(len(text)) or tokenize(self, text, **kw))
    huge = "word " * 2_000_000  # 10 MB
    t = time.perf_counter()
    with pytest.raises(ValueError, match="context limit is 256"):
        llm.generate(huge, SHORT)
    assert time.perf_counter() - t < 5 and max(lengths) <= 16 * 256
    assert _empty(llm)


@pytest.mark.parametrize("kwargs, match", [
    ({"page_size": "16"}, "page_size"), ({"page_size": 3}, "power of two"),
    ({"prefill_chunk": 0}, "prefill_chunk"), ({"max_model_len": 0}, "max_model_len"),
    ({"max_model_len": -5}, "max_model_len"), ({"device_kv_budget": "100000GiB"}, "memory"),
    ({"device_kv_budget": "1000000000000000GiB"}, "memory"),
    ({"policy": "quest", "policy_params": {"token_budget": "big"}}, "token_budget"),
    ({"policy": "quest", "policy_params": {"n_sink": True}}, "n_sink"),
    ({"backend": "ray", "ray_address": "127.0.0.1:70000"}, "out of range"),
    ({"backend": "ray", "ray_address": "ray://head:10001"}, "ray_address"),
])
def test_cheap_checks_come_before_the_model_loads(kwargs, match):
    with pytest.raises(ValueError, match=match):  # the model path is never looked at
        LLM("/nonexistent/model", device="cpu", **kwargs)


def test_soak_of_mixed_requests_leaves_the_store_as_it_found_it(tiny_model_dir):
    """500 requests on one LLM: valid, invalid, failing, interrupted, streamed and dropped,
    batched."""
    llm = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=32, device_kv_budget="512KiB",
              policy="quest", policy_params={"n_sink": 4, "n_local": 16, "token_budget": 32})
    free = llm.store.allocator.n_free
    rng = random.Random(0)
    texts = [TEXT[i : i + rng.randrange(20, 800)] for i in range(0, 2000, 97)]
    counts = dict.fromkeys(["ok", "invalid", "failed", "interrupted", "dropped", "batch", "too big"], 0)
    t = time.perf_counter()
    for i in range(500):
        kind = rng.choice(list(counts))
        params = SamplingParams(max_new_tokens=rng.randrange(1, 6), temperature=rng.choice([0, 0.8]),
                                seed=rng.randrange(100), ignore_eos=True)
        try:
            if kind == "ok":
                llm.generate(rng.choice(texts), params)
            elif kind == "invalid":
                llm.generate(rng.choice(["", [], [10**9], True, [["x"]]]), params)
            elif kind in ("failed", "interrupted"):
                exc = RuntimeError("boom") if kind == "failed" else KeyboardInterrupt()
                where = rng.choice(["prefill", "decode"])
                _fail_on(llm.engine, where, rng.randrange(1, 3), exc)
                try:
                    llm.generate([rng.choice(texts), rng.choice(texts)], params)
                finally:
                    delattr(llm.engine, where)  # the class's method again
            elif kind == "dropped":
                g = llm.stream(rng.choice(texts), params)
                for _ in range(rng.randrange(1, 3)):
                    next(g, None)
                del g
            elif kind == "batch":
                llm.generate(rng.sample(texts, 3), params)
            else:  # a batch the budget cannot hold
                llm.generate([TEXT * 10] * 8, params)
        except (ValueError, TypeError, RuntimeError, KeyboardInterrupt):
            pass
        counts[kind] += 1
        assert not llm.store.tables, (i, kind)
    gc.collect()
    assert llm.store.allocator.n_free == free and not llm.store.host
    assert time.perf_counter() - t < 60 and min(counts.values()) > 30
