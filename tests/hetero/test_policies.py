"""Policies end to end on the tiny model: offloading must not change exact attention, and
sparse policies that cover every page must equal dense."""

import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.policies import POLICIES, make_policy
from hetero.policies.quest import QuestPolicy

TEXT = open("/usr/share/common-licenses/Apache-2.0").read()[:1500]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
# 2 layers * 2 kv heads * 16 dims * 2 (K, V) * 4 bytes = 512 B per token
KV_PER_TOKEN = 512


def _llm(path, policy="dense", budget="8MiB", **params):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=32, policy=policy,
               policy_params=params, device_kv_budget=budget)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = _llm(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"][:300]
    return ids, llm.generate(ids, GREEDY)[0], llm.logprobs(TEXT)


def test_dense_offloaded_equals_dense_in_place(tiny_model_dir, reference):
    ids, ref, ref_lp = reference
    budget = 200 * KV_PER_TOKEN  # two thirds of the KV: the sequence must offload
    llm = _llm(tiny_model_dir, "dense", budget, n_sink=4, n_local=16, stream_pages=8)
    (out,) = llm.generate(ids, GREEDY)
    assert out.token_ids == ref.token_ids
    s = out.stats
    assert s.d2h_bytes > 0 and s.h2d_bytes > 0 and s.host_kv_bytes > 0
    assert s.device_kv_bytes_peak <= budget
    lp = llm.logprobs(TEXT)
    torch.testing.assert_close(torch.tensor(lp.logprobs), torch.tensor(ref_lp.logprobs),
                               atol=1e-4, rtol=1e-4)
    assert llm.store.allocator.n_used == 0


@pytest.mark.parametrize("policy, params", [
    ("streaming", {"n_sink": 4, "n_local": 400}),
    ("quest", {"n_sink": 4, "n_local": 16, "token_budget": 4096, "dense_layers": 1}),
    ("quest", {"n_sink": 4, "n_local": 16, "token_budget": 4096, "dense_layers": 0}),
    ("magicpig", {"n_sink": 4, "n_local": 16, "lsh_k": 0, "lsh_l": 2, "dense_layers": 0}),
])
def test_sparse_policies_that_cover_everything_equal_dense(tiny_model_dir, reference, policy, params):
    ids, ref, _ = reference
    (out,) = _llm(tiny_model_dir, policy, **params).generate(ids, GREEDY)
    assert out.token_ids == ref.token_ids
    if policy == "quest":  # it would fetch back every page it offloads: it keeps them all
        assert out.stats.d2h_bytes == out.stats.h2d_bytes == out.stats.host_kv_bytes == 0


@pytest.mark.parametrize("dense_layers", [0, 1])
def test_quest_offloading_with_every_page_in_its_top_pages_equals_dense(tiny_model_dir, reference,
                                                                        monkeypatch, dense_layers):
    # forced to offload (it would keep such a sequence whole): the scoring, the head cache and
    # the fetches run, and picking every offloaded page must give exact attention
    ids, ref, _ = reference
    monkeypatch.setattr(QuestPolicy, "offloads", lambda self, fits, n, ps: True)
    llm = _llm(tiny_model_dir, "quest", n_sink=4, n_local=16, token_budget=4096, dense_layers=dense_layers)
    (out,) = llm.generate(ids, GREEDY)
    assert out.token_ids == ref.token_ids
    s = out.stats
    assert s.d2h_bytes > 0 and s.h2d_bytes > 0 and s.cache_hit_rate > 0.5
    assert llm.store.allocator.n_used == 0


def test_quest_offloads_once_its_top_pages_cannot_cover_the_offloadable_pages():
    quest = make_policy("quest", n_sink=4, n_local=16, token_budget=4 + 16 + 3 * 4)  # 3 pages
    # pages between the sink page and the window's first, (n - 16) // 4: 1..3 at 35 tokens
    assert not quest.offloads(True, 35, 4)
    assert quest.offloads(True, 36, 4)  # 1..4: a page more than the top pages
    assert quest.offloads(False, 35, 4)  # the whole KV does not fit the budget


@pytest.mark.parametrize("policy", ["streaming", "quest", "magicpig", "actqkv"])
def test_sparse_policies_offload_and_stay_in_budget(tiny_model_dir, reference, policy):
    ids, _, _ = reference
    budget = 480 * KV_PER_TOKEN  # two sequences of 534 tokens in all
    llm = _llm(tiny_model_dir, policy, budget, n_sink=4, n_local=16,
               **{"quest": {"token_budget": 64, "dense_layers": 0}, "magicpig": {"dense_layers": 0},
                  "actqkv": {"window": 16, "top_blocks": 4, "min_blocks": 2}}.get(policy, {}),
               stream_pages=8)
    (out,) = llm.generate([ids, ids[:200]], GREEDY)[:1]
    s = out.stats
    assert len(out.token_ids) == 12 and s.device_kv_bytes_peak <= budget
    assert s.d2h_bytes > 0 and s.host_kv_bytes > 0
    full_kv = (len(ids) + 12 + 200 + 12) * KV_PER_TOKEN
    if policy in ("quest", "actqkv"):
        assert 0 < s.h2d_bytes
        rep = llm.memory_report()
        assert rep["cache_hits"] + rep["cache_misses"] > 0
    assert llm.store.allocator.n_used == 0
    assert s.device_kv_bytes_peak < full_kv


def test_a_batch_fits_a_budget_of_exactly_its_resident_sets(tiny_model_dir, reference):
    ids, _, _ = reference
    params = dict(n_sink=4, n_local=16, token_budget=64, dense_layers=1)
    llm = _llm(tiny_model_dir, "quest", **params)
    cfg, ps, chunk = llm.config, llm.store.page_size, llm.engine.prefill_chunk
    pages = sum(llm.policy.device_pages(cfg, n + 12, ps, chunk) for n in (len(ids), 200))
    llm = _llm(tiny_model_dir, "quest", pages * llm.store.page_bytes, **params)
    outs = llm.generate([ids, ids[:200]], GREEDY)  # the dense layer's pages count once
    assert [len(o.token_ids) for o in outs] == [12, 12] and llm.store.allocator.n_used == 0


@pytest.mark.parametrize("n", [60, 90])
def test_a_short_offloading_quest_sequence_fits_its_estimate(tiny_model_dir, reference, n):
    """A sequence barely longer than quest's selection, forced to offload: its head caches
    (the top pages and copies of the resident ones) outgrow the layer's own pages, and the
    budget ``device_pages`` gives must still hold them (it once capped a layer at its
    pages + 1, and decoding ran out of pages)."""
    ids = reference[0][:n]
    params = dict(n_sink=4, n_local=16, token_budget=4 + 16 + 10 * 4, dense_layers=1)
    llm = _llm(tiny_model_dir, "quest", **params)
    cfg, ps, chunk = llm.config, llm.store.page_size, llm.engine.prefill_chunk
    pages = llm.policy.device_pages(cfg, n + 12, ps, chunk)
    llm = _llm(tiny_model_dir, "quest", pages * llm.store.page_bytes, **params)
    (out,) = llm.generate(ids, GREEDY)
    assert len(out.token_ids) == 12 and out.stats.host_kv_bytes > 0  # it offloaded
    assert out.stats.device_kv_bytes_peak <= pages * llm.store.page_bytes


def test_budget_below_the_resident_set_is_a_clear_error(tiny_model_dir):
    llm = _llm(tiny_model_dir, "quest", 24 * 4 * KV_PER_TOKEN // 4, n_sink=4, n_local=16,
               token_budget=64)
    with pytest.raises(ValueError, match="cannot hold the resident set"):
        llm.generate("word " * 200, GREEDY)
    assert not llm.store.tables and llm.store.allocator.n_used == 0


@pytest.mark.parametrize("name, params, match", [
    ("quest", {"token_budget": 10, "n_sink": 4, "n_local": 16}, "token_budget"),
    ("streaming", {"n_local": 0}, "n_local"),
    ("dense", {"stream_pages": 0}, "stream_pages"),
    ("quest", {"n_sink": -1}, "n_sink"),
    ("dense", {"token_budget": 5}, "token_budget"),
    ("actqkv", {"dense_layers": 1}, "dense_layers must be 0"),
    ("actqkv", {"min_blocks": 0}, "min_blocks must be an integer >= 1"),
    ("actqkv", {"window": 0}, "window must be an integer >= 1"),
])
def test_bad_policy_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, **params)


def test_every_policy_is_registered_by_its_name():
    assert set(POLICIES) == {"dense", "streaming", "quest", "magicpig", "actqkv"}
    assert all(cls.name == name for name, cls in POLICIES.items())


def test_a_policy_with_raw_qk_sees_q_and_k_before_rope(tiny_model_dir):
    """on_qk gets each layer's q and k before the rotary embedding, at prefill (a chunk of
    one sequence; layer by layer, as the sequence offloads) and decode (a row per
    sequence): rotated at their positions, the keys are the ones the store holds."""
    from dataclasses import dataclass, field

    from hetero.model import apply_rope
    from hetero.policies import StreamingPolicy, register_policy

    @dataclass(slots=True)
    class RawQK(StreamingPolicy):
        name = "raw-qk-test"
        raw_qk = True
        _seen: list = field(default_factory=list, init=False)

        def on_qk(self, layer, seq_ids, q, k):
            self._seen.append((layer, list(seq_ids), q.clone(), k.clone()))

    register_policy(RawQK)
    try:
        llm = _llm(tiny_model_dir, "raw-qk-test", n_local=64)  # nothing leaves: every key stays
    finally:
        del POLICIES["raw-qk-test"]
    ids = llm.tokenizer(TEXT)["input_ids"][:40]
    keys = {}

    def keep(layer, q, plan, out):  # the keys the store holds, in token order
        table = plan.step.tables[0]
        pages = torch.tensor(table.layers[layer][: -(-table.n_tokens // 4)])
        slots = (pages[:, None] * 4 + torch.arange(4)).flatten()[: table.n_tokens]
        keys[layer] = llm.store.k[:, slots].transpose(0, 1).clone()  # [n, Hkv, D]

    llm.engine.attention_hooks.append(keep)
    llm.generate(ids, SamplingParams(max_new_tokens=3, ignore_eos=True))
    n_layers, seen = llm.config.n_layers, llm.policy._seen
    prefill = seen[: 2 * n_layers]  # 40 tokens: chunks of 32 and 8, layer by layer
    assert [(layer, seqs, k.shape[0]) for layer, seqs, _, k in prefill] == [
        (layer, [0], n) for layer in range(n_layers) for n in (32, 8)]
    decode = seen[2 * n_layers :]
    assert len(decode) == 2 * n_layers  # two decode steps
    assert all(k.shape[0] == 1 and q.shape[1] == llm.config.n_heads for _, _, q, k in decode)
    cos, sin = llm.model.rope.tables(torch.arange(42), torch.float32, 42)
    for layer, _, _, k in prefill[::2]:
        torch.testing.assert_close(apply_rope(k, cos[:32], sin[:32]), keys[layer][:32])
    for layer, _, _, k in decode[-n_layers:]:  # the last step fed position 41
        torch.testing.assert_close(apply_rope(k, cos[41:], sin[41:]), keys[layer][41:])
