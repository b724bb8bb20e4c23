"""The engine's prefill of an offloading sequence: layer by layer, with one layer's whole KV
on the device or, when even that does not fit, the layer's prior KV streamed back through the
prefill kernel; never the decode kernel. Its KV and logits equal chunk-major dense in place."""

import functools

import pytest
import torch

import hetero.engine
import hetero.llm
import hetero.policies.exact
from hetero import LLM, SamplingParams
from hetero.cache import OFFLOADED, KVStore

TEXT = open("/usr/share/common-licenses/Apache-2.0").read()[:2000]
N = 300  # prompt tokens: 75 pages of 4 tokens per layer
CHUNK = 32


def _llm(path, budget="8MiB", policy="dense", **params):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=CHUNK, policy=policy,
               policy_params=params, device_kv_budget=budget)


def _prefill(llm, ids):
    seq, _, _ = llm.scheduler.place(len(ids))
    return seq, llm.engine.prefill(seq, ids)


def _kv(llm, seq, n):
    """K and V of every layer [L, 2, Hkv, n, D] by position, wherever each page lives."""
    store, ps = llm.store, llm.store.page_size
    cfg = llm.config
    out = torch.empty(cfg.n_layers, 2, cfg.n_kv_heads, n, cfg.head_dim)
    for layer, pages in enumerate(store.tables[seq].layers):
        for i, p in enumerate(pages[: -(-n // ps)]):
            a, b = i * ps, min(n, (i + 1) * ps)
            src = store.host[seq][layer, :, :, a:b] if p == OFFLOADED else store.kv[:, :, p * ps : p * ps + b - a]
            out[layer, :, :, a:b] = src
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = _llm(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"][:N]
    assert len(ids) == N
    seq, logits = _prefill(llm, ids)
    assert not llm.store.tables[seq].offload
    return ids, logits, _kv(llm, seq, N)


def _budget(llm, n, stream):
    """Bytes that hold an offloading sequence of ``n`` tokens and its prefill, but not its
    whole KV (nor, with ``stream``, one layer's whole KV beside its resident set)."""
    cfg, ps, policy = llm.config, llm.store.page_size, llm.policy
    pages = policy.device_pages(cfg, n, ps, CHUNK, stream_prefill=stream)
    assert pages < cfg.n_layers * -(-n // ps)
    if stream:
        assert pages < policy.device_pages(cfg, n, ps, CHUNK)
    return pages * llm.store.page_bytes


@pytest.mark.parametrize("stream", [False, True], ids=["whole-layer", "streamed"])
def test_layerwise_prefill_equals_chunk_major_dense(tiny_model_dir, reference, monkeypatch, stream):
    ids, ref_logits, ref_kv = reference
    probe = _llm(tiny_model_dir, n_sink=4, n_local=16, stream_pages=8)
    llm = _llm(tiny_model_dir, _budget(probe, N, stream), n_sink=4, n_local=16, stream_pages=8)

    calls = {"prefill": 0, "prior": 0}

    def count(name, fn):
        @functools.wraps(fn)
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    def folded_decode(*args, **kwargs):
        raise AssertionError("a prefill chunk went through the decode kernel")

    monkeypatch.setattr(hetero.engine, "prefill_attention", count("prefill", hetero.engine.prefill_attention))
    monkeypatch.setattr(hetero.policies.exact, "prior_attention",
                        count("prior", hetero.policies.exact.prior_attention))
    monkeypatch.setattr(hetero.policies.exact, "paged_decode_attention", folded_decode)

    seq, logits = _prefill(llm, ids)
    table = llm.store.tables[seq]
    assert table.offload and table.stream_prefill == stream
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_kv(llm, seq, N), ref_kv, atol=1e-5, rtol=1e-5)
    assert OFFLOADED in table.layers[0] and OFFLOADED in table.layers[1]
    n_chunks = -(-N // CHUNK)
    rep = llm.store.memory_report()
    assert rep.device_kv_bytes_peak <= llm.store.budget
    if stream:  # the first chunk of a layer has no offloaded prior KV, the others stream it
        assert calls["prefill"] == 2 and calls["prior"] > 0 and rep.h2d_bytes > 0
    else:  # every chunk of every layer through the prefill kernel in place; nothing comes back
        assert calls == {"prefill": 2 * n_chunks, "prior": 0} and rep.h2d_bytes == 0
    offloaded = sum(p == OFFLOADED for pages in table.layers for p in pages)
    assert rep.d2h_bytes == offloaded * llm.store.page_bytes  # each page leaves once
    llm.engine.release(seq)
    assert llm.store.allocator.n_used == 0


def test_a_budget_below_a_layers_resident_set_and_one_chunk_is_an_error(tiny_model_dir):
    probe = _llm(tiny_model_dir, n_sink=4, n_local=16, stream_pages=8)
    need = _budget(probe, N + 8, stream=True)
    llm = _llm(tiny_model_dir, need - probe.store.page_bytes, n_sink=4, n_local=16, stream_pages=8)
    with pytest.raises(ValueError, match="cannot hold the resident set and one prefill chunk"):
        llm.generate(TEXT, SamplingParams(max_new_tokens=8))
    assert not llm.store.tables and llm.store.allocator.n_used == 0
    # a budget of exactly that is admitted and streams its prefill
    llm = _llm(tiny_model_dir, need, n_sink=4, n_local=16, stream_pages=8)
    ids = llm.tokenizer(TEXT)["input_ids"][:N]
    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.stats.device_kv_bytes_peak <= need


def test_a_growing_pool_keeps_what_its_pages_hold(tiny_model_dir, monkeypatch):
    """The CUDA pool grows with use; forced on here, a quest run equals the fixed pool's."""
    params = dict(n_sink=4, n_local=16, token_budget=32, dense_layers=1)
    ids = _llm(tiny_model_dir).tokenizer(TEXT)["input_ids"][:N]
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    (ref,) = _llm(tiny_model_dir, "2MiB", "quest", **params).generate(ids, greedy)
    monkeypatch.setattr(hetero.llm, "KVStore", functools.partial(KVStore, grow=True))
    llm = _llm(tiny_model_dir, "2MiB", "quest", **params)
    assert llm.store.memory_report().device_pool_bytes == 0  # nothing before a request
    (out,) = llm.generate(ids, greedy)
    assert out.token_ids == ref.token_ids
    assert out.stats.h2d_bytes == ref.stats.h2d_bytes and out.stats.d2h_bytes == ref.stats.d2h_bytes
    pool = llm.store.memory_report().device_pool_bytes
    assert out.stats.device_kv_bytes_peak <= pool < llm.store.budget
