"""ActQKV on the tiny model (trained to 512 positions): its probe-query rule and dynamic
cut-off against numpy ports of ActQKV's code, its bounded-position attention against a
direct torch oracle of InfLLM's rule, exactness while nothing has left the local window,
and prompts past the trained context."""

import numpy as np
import pytest
import torch

from cpu_kernels.block_memory import cutoff, select_blocks

from hetero import LLM, SamplingParams
from hetero.model import apply_rope
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.device import Device
from hetero.policies import actqkv
from hetero.policies.actqkv import ActQKVPolicy, attention, attention_math, dynamic_blocks, probe_query

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
    assert cutoff(scores.astype(np.float32), 6, 32).tolist() == got.tolist()  # the CPU's numba twin
    assert dynamic_blocks(torch.zeros(2, 3), 6, 32).tolist() == [3, 3]  # fewer blocks than the minimum
    assert dynamic_blocks(torch.zeros(1, 50), 32, 8).tolist() == [8]  # a minimum above the maximum


def test_flat_scores_keep_more_blocks_than_peaked_ones():
    flat, peaked = torch.zeros(1, 500), torch.zeros(1, 500)
    peaked[0, :3] = 20.0
    assert dynamic_blocks(flat, 6, 32).item() == 32 and dynamic_blocks(peaked, 6, 32).item() == 6


# -- the key bounds -------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, n_layers=1, n_heads=4,
                  n_kv_heads=2, head_dim=8)
PS, N = 4, 128  # 32 pages: sink page 0, pages 1..29 offloaded, window pages 30 and 31


def _offloaded(k, scores, batches):
    """A store holding keys ``k`` [N, Hkv, D] of sequence 0 whose pages 1..29 left the window
    in ``batches`` (the policy writing representatives and bounds as they go), the local
    scores being ``scores`` [Hkv, N] (in the policy's ring: a batch must fit it); and the
    policy."""
    store = KVStore(CFG, Device(torch.device("cpu")), torch.float32, PS, 256 * 2 * 2 * PS * 8 * 4)
    policy = ActQKVPolicy(n_sink=4, n_local=8, window=4, top_blocks=6, min_blocks=6, n_repr=2,
                          bound_group=4, bound_top=1)
    policy.bind(None, store)
    table = store.admit(0, N, offload=True)
    store.reserve(0, N)
    store.write(store.slots(0, 0, N)[0], k, torch.zeros_like(k))
    table.n_tokens, table.settled, table.sink_pages = N, 30, 1
    state = policy._state(store, 0)
    for pages in batches:
        ring = state.scores.shape[-1]
        for p in pages:
            t = torch.arange(p * PS, (p + 1) * PS)
            state.scores[0][:, t % ring] = scores[:, t]
        policy.on_offload(store, 0, 0, pages, store.offload(0, 0, pages))
    return store, policy


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "tensor-ops"])
def test_scores_are_the_representatives_cosine_and_the_groups_key_bounds(monkeypatch, kernel):
    """Bounds widen page by page across offload batches, over the offloaded pages only
    (group 0 holds the sink page); representatives are int8 codes of the unit mean of each
    page's top keys; the bound's best group per head comes first in the ranking, raised by
    ``FORCED``."""
    monkeypatch.setattr(actqkv, "_kernel_runs", lambda pool: kernel)
    torch.manual_seed(0)
    k = torch.randn(N, 2, 8)
    local = torch.randn(2, N)
    singles = [[p] for p in range(1, 30)]  # the ring holds 5 pages' local scores
    store, policy = _offloaded(k, local, singles[:10] + [[11, 12, 13], [14, 15]] + singles[15:])
    store2, _ = _offloaded(k, local, singles)
    run = store.tables[0].offloaded
    assert run == range(1, 30)
    pages = k.view(-1, PS, 2, 8)  # [page, token, Hkv, D]
    for _ in range(5):
        probe = torch.randn(2, 8)
        scores, bound = policy.scores(store, 0, 0, probe, run)
        rank = policy.ranked(store, 0, 0, probe, run)[1]
        for h in range(2):
            want = []
            for g in range(8):
                keys = pages[[p for p in range(4 * g, 4 * g + 4) if p in run], :, h].flatten(0, 1)
                want.append(torch.maximum(probe[h] * keys.amax(0), probe[h] * keys.amin(0)).sum())
            torch.testing.assert_close(bound[h], torch.stack(want), atol=1e-5, rtol=1e-5)
            best = int(torch.stack(want).argmax())
            assert set(torch.nonzero(rank[h] - scores[h] == actqkv.FORCED)[:, 0].tolist()) == {
                p - run.start for p in range(4 * best, 4 * best + 4) if p in run}
            for p in run:
                top = local[h, p * PS : (p + 1) * PS].topk(2).indices
                rep = torch.nn.functional.normalize(pages[p, top, h].mean(0), dim=0)
                assert abs(scores[h, p - run.start] - rep @ probe[h] / probe[h].norm()) < 0.02  # int8 codes
    torch.testing.assert_close(policy.scores(store2, 0, 0, probe, run)[1], bound)  # batches or not


@pytest.mark.parametrize("n, top", [(45, 12), (45, 3), (9, 9), (700, 128)])
def test_the_cpus_selection_keeps_the_rankings_top_blocks(monkeypatch, n, top):
    """``select_blocks`` (numba, linear) keeps each head's first ``keep[h]`` blocks of the
    tensor ops' ranking (``ranked`` and a sorted top-k): the bound's groups first (more of
    them than ``keep`` when ``top`` is 3), then the best scores."""
    torch.manual_seed(n + top)
    run = range(4, 4 + n)
    policy = ActQKVPolicy(top_blocks=top, min_blocks=min(2, top))
    scores = torch.rand(3, n) * 2 - 1
    bound = torch.randn(3, (run.stop - 1) // policy.bound_group + 1)
    monkeypatch.setattr(ActQKVPolicy, "scores", lambda self, *args: (scores, bound))
    rank = policy.ranked(None, 0, 0, None, run)[1]
    keep = torch.randint(1, top + 1, (3,)).numpy()
    got = select_blocks(scores.numpy(), bound.numpy(), run, policy.bound_group, policy.bound_top, actqkv.FORCED,
                        keep, top)
    for h in range(3):
        want = rank[h].topk(int(keep[h])).indices + run.start
        assert sorted(got[h, : keep[h]].tolist()) == sorted(want.tolist())
        assert (got[h, keep[h] :] == -1).all()


def test_the_bound_keeps_a_block_whose_representative_misses_its_outlier_key():
    """InfLLM's representative averages the keys the local queries scored highest; a key
    they ignored (the passkey's digits, to the filler after them) is lost from it. The key
    bound over the block's group still ranks it first."""
    torch.manual_seed(1)
    k = torch.randn(N, 2, 8) * 0.1
    probe = torch.zeros(2, 8)
    probe[:, 0] = 1.0
    k[17 * PS : 18 * PS, :, 0] = -0.5  # page 17 (group 4) points away from the probe
    k[17 * PS + 3, :, 0] = 5.0  # but for its outlier
    scores = torch.ones(2, N)
    scores[:, 17 * PS + 3] = -1.0  # the local queries ignored it
    store, policy = _offloaded(k, scores, [[p] for p in range(1, 30)])  # as they leave the window
    run = store.tables[0].offloaded
    plain, rank = policy.ranked(store, 0, 0, probe, run)
    assert (plain[:, 17 - run.start, None] < plain.topk(6, dim=1).values[:, -1:]).all()  # not among the top 6
    assert (rank.topk(6, dim=1).indices == 17 - run.start).any(1).all()
    policy.bound_top = 0
    assert torch.equal(policy.ranked(store, 0, 0, probe, run)[1], plain)


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


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "tensor-ops"])
def test_bounded_positions_with_every_block_selected_equal_the_oracle(tiny_model_dir, monkeypatch, kernel):
    """Top blocks and cut-off cover every offloaded page: prefill (window by window) and
    decode (token by token) equal InfLLM's rule computed directly, through the CPU's numba
    decode kernel and through the tensor ops a GPU runs."""
    monkeypatch.setattr(actqkv, "_kernel_runs", lambda pool: kernel)
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
    assert llm.memory_report()["h2d_bytes"] > 0  # prefill's memory came through the head cache


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "tensor-ops"])
def test_the_cpus_decode_reads_the_host_tier_in_place(tiny_model_dir, monkeypatch, kernel):
    """On the CPU, decode attends over the kept blocks where they lie in the host tier: no
    host-to-device bytes, where the tensor ops (a GPU's path) fetch them into the head cache."""
    monkeypatch.setattr(actqkv, "_kernel_runs", lambda pool: kernel)
    llm = _llm(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"]
    traffic = llm.store.device.traffic
    moved = []
    for n_decode in (2, 40):  # the same prefill, then more decode steps
        before = traffic.h2d_bytes
        llm.decode_logprobs(ids[:300], ids[300 : 300 + n_decode])
        moved.append(traffic.h2d_bytes - before)
    assert (moved[1] == moved[0]) == kernel
    read, seen = llm.policy.key_counts()
    assert 0 < read < seen


def test_nothing_past_the_local_window_is_exact(tiny_model_dir):
    """Until a page leaves the local window every token attends to all before it at true
    positions: actqkv equals dense."""
    dense, act = _llm(tiny_model_dir, "dense"), _llm(tiny_model_dir)
    ids = dense.tokenizer(TEXT)["input_ids"][:36]  # n_local + one page: nothing leaves during prefill
    np.testing.assert_allclose(act.logprobs(ids[:36]).logprobs, dense.logprobs(ids[:36]).logprobs, atol=1e-4)
    np.testing.assert_allclose(act.decode_logprobs(ids[:30], ids[30:36]),
                               dense.decode_logprobs(ids[:30], ids[30:36]), atol=1e-4)


def test_the_decode_kernel_equals_the_tensor_ops_with_a_sparse_selection(tiny_model_dir, monkeypatch):
    """4 of ~40 blocks per head, the cut-off keeping 2 to 4: the numba kernels select and
    read in the host tier the blocks that the tensor ops fetch into the head cache and keep
    past their mask, and leave the same local scores."""
    ids = _llm(tiny_model_dir).tokenizer(TEXT)["input_ids"]
    runs = []
    for kernel in (True, False):
        monkeypatch.setattr(actqkv, "_kernel_runs", lambda pool: kernel)
        llm = _llm(tiny_model_dir)
        runs.append(np.array(llm.decode_logprobs(ids[:150], ids[150:190])))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-4)


def test_the_last_window_reads_final_blocks_one_layer_at_a_time(tiny_model_dir, monkeypatch):
    """The prompt's last window (where the question usually is) reads ``final_blocks`` blocks
    per head; each layer's head cache shrinks back to ``top_blocks`` after it, within the
    prefill budget."""
    llm = _llm(tiny_model_dir, final_blocks=12)
    ps, n_layers = llm.store.page_size, llm.config.n_layers
    reads, peak = [], [0]
    prior = actqkv.prior_attention

    def spy(q, k, v, table, n, *args):
        reads.append(n)
        peak[0] = max(peak[0], llm.store.allocator.n_used)
        return prior(q, k, v, table, n, *args)

    monkeypatch.setattr(actqkv, "prior_attention", spy)
    ids = llm.tokenizer(TEXT)["input_ids"][:150]  # windows of 16: the last one from 144
    llm.generate(ids, SamplingParams(max_new_tokens=1))
    sinks = llm.policy.n_sink
    assert reads[-n_layers:] == [sinks + 12 * ps] * n_layers
    assert set(reads[:-n_layers]) <= {sinks + k * ps for k in range(1, 5)} and 4 * ps + sinks in reads
    assert peak[0] <= llm.policy.device_pages(llm.config, 150 + 1, ps, 32)


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
