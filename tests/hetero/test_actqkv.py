"""ActQKV on the tiny model (trained to 512 positions): its probe-query rule and dynamic
cut-off against numpy ports of ActQKV's code, its bounded-position attention against a
direct torch oracle of InfLLM's rule, exactness while nothing has left the local window,
and prompts past the trained context."""

import numpy as np
import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.model import apply_rope
from hetero.policies.actqkv import attention, attention_math, dynamic_blocks, probe_query

TEXT = open("/usr/share/common-licenses/GPL-3").read()
PARAMS = dict(n_sink=8, n_local=32, window=16, top_blocks=4, min_blocks=2, n_repr=2)


def _llm(path, policy="actqkv", **params):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=32, policy=policy,
               policy_params={**PARAMS, **params} if policy == "actqkv" else params, device_kv_budget="8MiB")


# -- the rules, against numpy ports ------------------------------------------------------------


def _np_probe(windows):
    """ActQKV's ``activate`` in its steady state, per KV head: running mean and (population)
    variance over every query so far, the window's deviation per token, its weights, the
    weighted sum."""
    seen, probes = [], []
    for q in windows:  # [C, H, F]
        seen.append(q.astype(np.float64))
        x = np.concatenate(seen)
        mu, var = x.mean(0), x.var(0)
        dev = (q - mu) ** 2 / (var + var.mean(-1, keepdims=True) / 100)
        w = dev.mean(-1)
        w = w / w.sum(0)
        probes.append(np.einsum("ch,chf->hf", w, q))
    return probes


def test_probe_query_matches_actqkvs_rule():
    rng = np.random.default_rng(0)
    windows = [rng.normal(size=(c, 3, 12)).astype(np.float32) * rng.uniform(0.5, 3, size=12).astype(np.float32)
               for c in (16, 16, 7)]
    windows[1][3] += 8.0  # one token stands out: it dominates the probe
    mean = var = None
    count = 0
    for q, ref in zip(windows, _np_probe(windows)):
        probe, mean, var = probe_query(torch.from_numpy(q), mean, var, count)
        count += q.shape[0]
        np.testing.assert_allclose(probe.numpy(), ref, rtol=1e-4, atol=1e-5)
    w1 = _np_probe(windows[:2])[1]
    assert np.all(np.abs(w1 - windows[1][3]) < np.abs(w1 - windows[1].mean(0)))


def _np_cutoff(scores, k_min, k_max):
    out = []
    for s in scores:
        n = len(s)
        p = np.exp(s - s.max())
        p /= p.sum()
        h = -(p * np.log(p + 1e-10)).sum()
        frac = np.exp(10 * (2 / (1 + np.exp(-10 * (h - np.log(n)))) - 1))
        k = round(min(n, k_min) + (min(n, k_max) - min(n, k_min)) * frac)
        out.append(min(max(k, min(n, k_min)), min(n, k_max)))
    return out


@pytest.mark.parametrize("sharpness", [0.0, 0.5, 2.0, 8.0])
def test_dynamic_cutoff_matches_actqkvs_rule(sharpness):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 200)) * sharpness
    got = dynamic_blocks(torch.from_numpy(scores).float(), 6, 32)
    assert got.tolist() == _np_cutoff(scores, 6, 32)
    assert dynamic_blocks(torch.zeros(2, 3), 6, 32).tolist() == [3, 3]  # fewer blocks than the minimum
    assert dynamic_blocks(torch.zeros(1, 50), 32, 8).tolist() == [8]  # a minimum above the maximum


def test_flat_scores_keep_more_blocks_than_peaked_ones():
    flat, peaked = torch.zeros(1, 500), torch.zeros(1, 500)
    peaked[0, :3] = 20.0
    assert dynamic_blocks(flat, 6, 32).item() == 32 and dynamic_blocks(peaked, 6, 32).item() == 6


# -- attention, against a direct oracle ---------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_the_device_path_of_window_attention_equals_the_cpu_one(causal):
    """``attention_math`` (what a GPU runs for the local part) against torch's CPU flash op."""
    torch.manual_seed(0)
    q, k, v = torch.randn(24, 6, 16), torch.randn(2, 24, 16), torch.randn(2, 24, 16)
    for a, b in zip(attention(q, k, v, 0.25, causal), attention_math(q, k, v, 0.25, causal)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _oracle_logits(llm, ids, schedule):
    """Final logits [n, vocab] of ``ids`` processed in ``schedule`` ((start, length) windows)
    with InfLLM's bounded positions computed directly in float64 over the whole raw KV: the
    local part (tokens from the first local page on, at true relative positions, causal),
    the memory (sinks and every offloaded page, keys at position 0, queries at n_local)."""
    model, pol, ps = llm.model, llm.policy, llm.store.page_size
    rope = model.rope
    ks, vs = [[] for _ in model.blocks], [[] for _ in model.blocks]
    hidden = []
    for start, c in schedule:
        first = max(pol.n_sink // ps, (start - pol.n_local) // ps) * ps
        memory = first > pol.n_sink
        base = first if memory else 0

        def attend(layer, q, k, v):
            ks[layer].append(k.double())
            vs[layer].append(v.double())
            keys, values = torch.cat(ks[layer]), torch.cat(vs[layer])  # [n, Hkv, D], raw
            g = q.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
            n = start + c - base
            cos, sin = rope.span(n + pol.n_local + 1, torch.float64, q.device)
            kl = apply_rope(keys[base:], cos[:n], sin[:n])
            ql = apply_rope(q.double(), cos[n - c : n], sin[n - c : n])
            logits = torch.einsum("chd,nhd->hcn", ql, kl)
            logits.masked_fill_(torch.ones(c, n, dtype=torch.bool).triu_(n - c + 1), float("-inf"))
            vals = values[base:]
            if memory:
                qm = apply_rope(q.double(), cos[pol.n_local], sin[pol.n_local])
                logits = torch.cat([logits, torch.einsum("chd,nhd->hcn", qm, keys[:base])], dim=-1)
                vals = torch.cat([vals, values[:base]])
            p = torch.softmax(logits * llm.engine.scale, dim=-1)
            return torch.einsum("hcn,nhd->chd", p, vals).to(q.dtype)

        hidden.append(model(torch.tensor(ids[start : start + c]), None, attend))
    return model.logits(torch.cat(hidden))


def test_bounded_positions_with_every_block_selected_equal_the_oracle(tiny_model_dir):
    """Top blocks and cut-off cover every offloaded page: prefill (window by window) and
    decode (token by token) equal InfLLM's rule computed directly."""
    llm = _llm(tiny_model_dir, top_blocks=64, min_blocks=64)
    ids = llm.tokenizer(TEXT)["input_ids"][:200]
    context, cont = ids[:150], ids[150:]
    schedule = [(s, min(16, 150 - s)) for s in range(0, 150, 16)] + [(150 + i, 1) for i in range(len(cont))]
    ref = torch.log_softmax(_oracle_logits(llm, ids, schedule), dim=-1)
    got = llm.logprobs(context).logprobs
    want = ref[:149].gather(1, torch.tensor(context[1:])[:, None])[:, 0]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-4)
    got = llm.decode_logprobs(context, cont)
    want = ref[150:199].gather(1, torch.tensor(cont[1:])[:, None])[:, 0]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-4)
    assert llm.memory_report()["h2d_bytes"] > 0  # the memory came through the head cache


def test_nothing_past_the_local_window_is_exact(tiny_model_dir):
    """Until a page leaves the local window every token attends to all before it at true
    positions: actqkv equals dense."""
    dense, act = _llm(tiny_model_dir, "dense"), _llm(tiny_model_dir)
    ids = dense.tokenizer(TEXT)["input_ids"][:36]  # n_local + one page: nothing leaves during prefill
    np.testing.assert_allclose(act.logprobs(ids[:36]).logprobs, dense.logprobs(ids[:36]).logprobs, atol=1e-4)
    np.testing.assert_allclose(act.decode_logprobs(ids[:30], ids[30:36]),
                               dense.decode_logprobs(ids[:30], ids[30:36]), atol=1e-4)


def test_a_sparse_selection_stays_close_to_the_oracle(tiny_model_dir):
    """With 4 of the ~30 offloaded blocks per head the logits move, but stay near the full
    memory's."""
    full = _llm(tiny_model_dir, top_blocks=64, min_blocks=64)
    sparse = _llm(tiny_model_dir)
    ids = full.tokenizer(TEXT)["input_ids"][:160]
    a, b = np.array(full.logprobs(ids).logprobs), np.array(sparse.logprobs(ids).logprobs)
    assert 0 < np.abs(a - b).max() and np.abs(a - b).mean() < 0.5


# -- past the trained context ---------------------------------------------------------------------


def test_a_prompt_past_the_trained_context_runs_with_actqkv_only(tiny_model_dir):
    act, quest = _llm(tiny_model_dir), _llm(tiny_model_dir, "quest", n_sink=4, n_local=16, token_budget=64)
    ids = (act.tokenizer(TEXT)["input_ids"] * 2)[:700]  # trained: 512
    with pytest.raises(ValueError, match="context limit is 512 .*policy 'quest' cannot read past them: use "
                                         "policy='actqkv'"):
        quest.generate(ids, SamplingParams(max_new_tokens=2))
    (out,) = act.generate(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4 and out.stats.host_kv_bytes > 0
    assert out.stats.device_kv_bytes_peak < 700 * 512  # below the full KV
    assert out.stats.policy["state_bytes"] > 0
    assert act.max_model_len > 512 and act.store.allocator.n_used == 0


def test_window_must_hold_whole_pages(tiny_model_dir):
    with pytest.raises(ValueError, match="window .* must be multiples of page_size"):
        _llm(tiny_model_dir, window=6)


def test_a_batch_decodes_as_each_sequence_alone(tiny_model_dir):
    llm = _llm(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"]
    prompts = [ids[:300], ids[400:620]]
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batch = [o.token_ids for o in llm.generate(prompts, greedy)]
    assert batch == [llm.generate(p, greedy)[0].token_ids for p in prompts]
