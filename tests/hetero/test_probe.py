"""Measuring without touching the runtime: the probes of ``hetero.probe`` ride the engine's
public hooks and are removed on every exit; ``LLM.decode_logprobs`` scores a continuation
through the policy's decode attention (teacher forcing)."""

import pytest
import torch

from hetero import LLM
from hetero.model import Rope
from hetero.probe import (AttentionProbe, TopKAttention, TopKOracle, hooked, probe_attention, time_decode_steps,
                          topk_attention)
from tests.oracle import attention_oracle

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _tiny(path, policy="dense", **params):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=16, policy=policy,
               policy_params=params or None)


def _no_hooks(llm):
    return llm.engine.attention_hooks == [] and llm.engine.step_hooks == []


# -- teacher forcing ------------------------------------------------------------------------


def test_decode_logprobs_through_dense_equal_the_prefill_scores(tiny_model_dir):
    llm = _tiny(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"]
    ctx, cont = ids[:24], ids[24:34]
    got = llm.decode_logprobs(ctx, cont)
    # logprobs[i] = log p(ids[i+1] | ids[:i+1]): cont[1:] are ids[25:34]
    ref = llm.logprobs(ctx + cont).logprobs[-(len(cont) - 1) :]
    assert len(got) == len(cont) - 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-4)
    assert llm.store.allocator.n_used == 0 and not llm.store.tables


def test_decode_logprobs_see_the_sparse_policy(tiny_model_dir):
    """Streaming offloads the middle of the context and never reads it again: the decode
    steps' scores differ from the exact ones (which its prefill still gives)."""
    llm = _tiny(tiny_model_dir, "streaming", n_sink=4, n_local=8)
    ids = llm.tokenizer(TEXT)["input_ids"]
    ctx, cont = ids[:32], ids[32:40]
    got = llm.decode_logprobs(ctx, cont)
    ref = llm.logprobs(ctx + cont).logprobs[-(len(cont) - 1) :]
    assert len(got) == len(ref)
    assert max(abs(a - b) for a, b in zip(got, ref)) > 1e-3
    assert llm.store.allocator.n_used == 0 and not llm.store.tables


def test_decode_logprobs_take_text_context(tiny_model_dir):
    llm = _tiny(tiny_model_dir)
    ctx = llm.tokenizer(TEXT[:20])["input_ids"]
    assert llm.decode_logprobs(TEXT[:20], [5, 6, 7]) == llm.decode_logprobs(ctx, [5, 6, 7])


@pytest.mark.parametrize("continuation, match", [
    ([5], "at least two token ids"),
    ([], "at least two token ids"),
    ("some text", "at least two token ids"),
    ([1, 2.5], "at least two token ids"),
    ([1, -1], r"must be in \[0, "),
    ([1, 10**9], r"must be in \[0, "),
])
def test_decode_logprobs_check_the_continuation(tiny_model_dir, continuation, match):
    llm = _tiny(tiny_model_dir)
    with pytest.raises(ValueError, match=match):
        llm.decode_logprobs([1, 2, 3], continuation)
    assert not llm.store.tables


def test_decode_logprobs_check_the_context_limit(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16, max_model_len=32)
    with pytest.raises(ValueError, match="context limit is 32"):
        llm.decode_logprobs(list(range(1, 25)), list(range(1, 11)))  # 24 + 10 - 1 = 33
    assert len(llm.decode_logprobs(list(range(1, 24)), list(range(1, 11)))) == 9  # 32 fit
    with pytest.raises(ValueError, match="non-empty string or a list of token ids"):
        llm.decode_logprobs([], [1, 2])
    llm.close()
    with pytest.raises(ValueError, match="closed"):
        llm.decode_logprobs([1, 2], [3, 4])


def test_decode_logprobs_release_pages_on_an_error(tiny_model_dir):
    llm = _tiny(tiny_model_dir)

    def boom(layer, q, plan, out):
        raise RuntimeError("boom")

    with hooked(llm.engine.attention_hooks, boom), pytest.raises(RuntimeError, match="boom"):
        llm.decode_logprobs([1, 2, 3, 4, 5], [6, 7, 8])
    assert llm.store.allocator.n_used == 0 and not llm.store.tables and _no_hooks(llm)


# -- probes ---------------------------------------------------------------------------------


def test_attention_probe_of_dense_is_exact(tiny_model_dir):
    llm = _tiny(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"][:30]
    probe = probe_attention(llm, ids, 3)
    assert len(probe.step_errors()) == 3 and probe.mean_error() < 1e-5
    assert probe.mean_resident() == pytest.approx(32)  # 31, 32, 33 tokens, all on the device
    assert _no_hooks(llm) and llm.store.allocator.n_used == 0


def test_attention_probe_continues_with_exact_attention(tiny_model_dir):
    """Under streaming the probe records errors and hands the model exact attention: the
    tokens are dense's, and tokens offloaded while attending are counted as such."""
    from hetero import SamplingParams

    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ids = _tiny(tiny_model_dir).tokenizer(TEXT)["input_ids"][:40]
    (dense,) = _tiny(tiny_model_dir).generate(ids, params)
    llm = _tiny(tiny_model_dir, "streaming", n_sink=4, n_local=8)
    probe = AttentionProbe()
    with probe.attach(llm):
        (probed,) = llm.generate(ids, params)
    assert probed.token_ids == dense.token_ids
    assert probe.mean_error() > 1e-3 and probe.mean_resident() < 20
    assert _no_hooks(llm)


def test_probes_are_removed_on_an_error(tiny_model_dir):
    llm = _tiny(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        with AttentionProbe().attach(llm), time_decode_steps(llm):
            assert len(llm.engine.attention_hooks) == len(llm.engine.step_hooks) == 1
            raise KeyboardInterrupt
    assert _no_hooks(llm)


def test_time_decode_steps_records_each_step(tiny_model_dir):
    from hetero import SamplingParams

    llm = _tiny(tiny_model_dir)
    with time_decode_steps(llm) as steps:
        llm.generate([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(steps) == 3 and all(s > 0 for s in steps)  # the first token is the prefill's
    llm.generate([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(steps) == 3 and _no_hooks(llm)


def test_topk_oracle_attention():
    """Every key kept: exact attention; one key kept: that head's best-scoring value; values
    through slots of a pool as values in order."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 8, generator=g), torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    pos = torch.arange(10)
    exact, _ = attention_oracle(q[None].double(), k.transpose(0, 1).double(),
                                v.transpose(0, 1).double(), pos[-1:], pos, 0.5)
    torch.testing.assert_close(topk_attention(q, k, v, 10, 0.5).double(), exact[0], atol=1e-5, rtol=1e-5)
    best = (q.view(2, 2, 8) @ k.transpose(1, 2)).argmax(-1)  # [Hkv, G]
    want = torch.stack([v[h, best[h, j]] for h in range(2) for j in range(2)])
    torch.testing.assert_close(topk_attention(q, k, v, 1, 0.5), want)
    # values read from a pool through the keys' slots: the same
    slots = torch.randperm(16, generator=g)[:10]
    pool = torch.zeros(2, 16, 8).index_copy_(1, slots, v)
    torch.testing.assert_close(topk_attention(q, k, pool, 3, 0.5, slots), topk_attention(q, k, v, 3, 0.5))


def test_topk_oracle_probe_on_a_model(tiny_model_dir):
    """Keeping every key is exact; keeping a few is not; the run leaves no pages or hooks."""
    llm = _tiny(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"][:40]
    oracle = probe_attention(llm, ids, 3, TopKOracle([4, 64], skip_layers=1))
    every, few = oracle.step_errors(64), oracle.step_errors(4)
    assert len(every) == len(few) == 3
    assert max(every) < 1e-5 and min(few) > 1e-3
    assert llm.store.allocator.n_used == 0 and _no_hooks(llm)


def test_topk_attention_decodes_through_the_oracle(tiny_model_dir):
    """Decode through the hook (teacher forced): every key kept gives the dense run's
    logprobs; one key per head in the layers it covers gives others."""
    llm = _tiny(tiny_model_dir)
    ids = llm.tokenizer(TEXT)["input_ids"]
    ctx, cont = ids[:32], ids[32:40]
    dense = torch.tensor(llm.decode_logprobs(ctx, cont))
    with hooked(llm.engine.attention_hooks, TopKAttention(64, skip_layers=0)):
        every = torch.tensor(llm.decode_logprobs(ctx, cont))
    with hooked(llm.engine.attention_hooks, TopKAttention(1, skip_layers=1)):
        one = torch.tensor(llm.decode_logprobs(ctx, cont))
    torch.testing.assert_close(every, dense, atol=1e-4, rtol=1e-4)
    assert (one - dense).abs().max() > 1e-3
    assert llm.store.allocator.n_used == 0 and _no_hooks(llm)


def test_topk_oracle_needs_the_whole_kv(tiny_model_dir):
    llm = _tiny(tiny_model_dir, "streaming", n_sink=4, n_local=8)
    ids = llm.tokenizer(TEXT)["input_ids"][:40]
    with pytest.raises(ValueError, match="whole KV on the device"):
        probe_attention(llm, ids, 2, TopKOracle([4], skip_layers=0))
    assert llm.store.allocator.n_used == 0 and _no_hooks(llm)


# -- bounded positions ------------------------------------------------------------------------

GPL = open("/usr/share/common-licenses/GPL-3").read()
ACTQKV = dict(n_sink=8, n_local=32, window=16, top_blocks=4, min_blocks=2, n_repr=2)
EVERY_BLOCK = dict(top_blocks=10**5, min_blocks=10**5, final_blocks=10**5)


def _actqkv(path, **params):
    return LLM(path, device="cpu", page_size=4, prefill_chunk=32, policy="actqkv",
               policy_params={**ACTQKV, **params}, device_kv_budget="8MiB")


def test_exact_reference_under_bounded_positions_is_the_models_attention(tiny_model_dir):
    """actqkv stores keys and hands the hooks its query before the rotary embedding; the
    probe's reference rotates them at their true positions. The prompt fits the local window
    (its prefill is exact), then the decode steps offload pages to the host tier and actqkv's
    own output moves away from exact; with the probe's reference in its place the logits are
    dense's, an independent path (keys rotated as written, the paged decode kernel)."""
    dense = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=32)
    ids = dense.tokenizer(GPL)["input_ids"][:90]
    want = dense.decode_logprobs(ids[:30], ids[30:])
    llm, probe = _actqkv(tiny_model_dir), AttentionProbe()
    with probe.attach(llm):
        got = llm.decode_logprobs(ids[:30], ids[30:])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)  # unrotated: 3e-3 off
    assert probe.mean_resident() < 60 and max(probe.step_errors()) > 1e-2  # the host tier was read
    assert _no_hooks(llm) and llm.store.allocator.n_used == 0


def test_actqkv_with_every_block_selected_errs_by_its_positions_alone(tiny_model_dir, monkeypatch):
    """Every block selected, actqkv reads the whole KV and its error is the bounded
    positions' alone: not zero, and on this model far below that of a 4-block selection
    (0.02 against 0.6). With the rotary embedding made the identity (cos 1, sin 0) bounded
    positions are true positions: that error is gone, the selection's stays."""
    ids = _actqkv(tiny_model_dir).tokenizer(GPL)["input_ids"][:150]
    sparse = probe_attention(_actqkv(tiny_model_dir), ids, 6).mean_error()
    every = probe_attention(_actqkv(tiny_model_dir, **EVERY_BLOCK), ids, 6).mean_error()
    assert 1e-3 < every < sparse, (every, sparse)

    def no_rotation(rope, n, dtype, device):
        d = 2 * rope.inv_freq.shape[0]
        return torch.ones(n, 1, d, dtype=dtype, device=device), torch.zeros(n, 1, d, dtype=dtype, device=device)

    monkeypatch.setattr(Rope, "span", no_rotation)
    assert probe_attention(_actqkv(tiny_model_dir, **EVERY_BLOCK), ids, 6).mean_error() < 1e-5
    assert probe_attention(_actqkv(tiny_model_dir), ids, 6).mean_error() > 1e-3  # the selection's own
