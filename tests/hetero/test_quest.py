"""Quest's decode attention against a torch oracle: each KV head attends over the sinks, its
own top pages by the key-bound score, and the window, through the policy's head cache; the
policy keeps the key bounds of what leaves and frees its pages with the sequence."""

import pytest
import torch

from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.device import Device
from hetero.policies import DecodeStep
from hetero.policies.quest import QuestPolicy
from tests.hetero.test_store import PAGE_BYTES, _fill, _kv, _store

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=4)
PS, N = 4, 64  # 16 pages: sink page 0, pages 1..13 offloaded, window pages 14 and 15


def _oracle(q, k, v, policy, scale):
    """out [Hq, D] of one sequence: per KV head, the top pages of 1..13 by
    max_g sum_d max(q*kmax, q*kmin), plus pages 0, 14, 15; exact softmax."""
    hkv, g = CFG.n_kv_heads, CFG.n_heads // CFG.n_kv_heads
    pages_k = k.view(hkv, -1, PS, k.shape[-1])
    kmin, kmax = pages_k.amin(2), pages_k.amax(2)
    out = torch.empty_like(q)
    for h in range(hkv):
        qh = q[h * g : (h + 1) * g]  # [G, D]
        bound = torch.maximum(qh[:, None] * kmax[h], qh[:, None] * kmin[h]).sum(-1).amax(0)
        top = (bound[1:14].topk(policy.top_pages(PS)).indices + 1).tolist()
        pages = [0, *top, 14, 15]
        keys = pages_k[h, pages].reshape(-1, k.shape[-1])
        vals = v.view(hkv, -1, PS, k.shape[-1])[h, pages].reshape(-1, k.shape[-1])
        out[h * g : (h + 1) * g] = torch.softmax(qh @ keys.T * scale, -1) @ vals
    return out


def _offloaded(k, v):
    """A store holding keys ``k`` and values ``v`` [L, N, Hkv, D] of sequence 0, its pages
    1..13 offloaded with quest keeping their bounds, as the engine leaves them; and the
    policy (3 top pages per head)."""
    store = KVStore(CFG, Device(torch.device("cpu")), torch.float32, PS, 64 * 2 * 2 * PS * 4 * 4)
    policy = QuestPolicy(n_sink=4, n_local=8, token_budget=4 + 8 + 3 * PS, dense_layers=0)
    table = store.admit(0, N, offload=True)
    store.reserve(0, N)
    slots = store.slots(0, 0, N)
    for layer in range(2):
        store.write(slots[layer], k[layer], v[layer])
    table.n_tokens, table.settled, table.sink_pages = N, N // PS - 2, policy.sink_pages(PS)
    for layer in range(2):  # as the engine does: the policy keeps the bounds of what leaves
        pages = list(range(1, table.settled))
        policy.on_offload(store, 0, layer, pages, store.offload(0, layer, pages))
    return store, policy


def test_quest_decode_attention_equals_the_top_pages_oracle_step_after_step():
    torch.manual_seed(0)
    k, v = torch.randn(2, N, 2, 4), torch.randn(2, N, 2, 4)  # [L, N, Hkv, D]
    store, policy = _offloaded(k, v)
    for _ in range(4):  # new queries pick new pages: some stay in the head cache, some not
        q = torch.randn(1, 4, 4)
        plan = policy.plan(DecodeStep(store, [0], [N], 0.5))
        for layer in range(2):
            out = policy.run(layer, q, plan)
            ref = _oracle(q[0], k[layer].transpose(0, 1), v[layer].transpose(0, 1), policy, 0.5)
            torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    assert store.hits.value > 0 and store.misses.value > 0
    head_cache = 3 + 3 + 2  # top pages, copies of the 3 resident pages, spare
    # per layer: 3 resident KV pages, 4 metadata pages (16 pages of 4 descriptors), the cache
    assert store.allocator.n_used == 2 * (3 + 4 + head_cache)
    policy.on_release(0)  # the policy frees what it holds; the store, the KV
    assert store.allocator.n_used == 2 * 3
    store.release(0)
    assert store.allocator.n_used == 0


def test_head_cache_holds_each_heads_pages_in_shared_pages_and_copies_only_new_picks():
    store = _store(pages=32)
    _fill(store, 0, 32)  # 8 pages per layer
    kv = _kv(store, 0)
    pages_k = kv[1].view(2, 8, 4, 4)  # [Hkv, page, token, D]
    policy = QuestPolicy(n_sink=4, n_local=8, token_budget=4 + 8 + 2 * 4, dense_layers=0)
    policy.on_offload(store, 0, 1, [1, 2, 3, 4, 5], store.offload(0, 1, [1, 2, 3, 4, 5]))
    kmin, kmax = policy.key_bounds(store, 0, 1)  # the bounds it kept
    assert torch.equal(kmin[:, 1:6], pages_k[:, 1:6].amin(2))
    assert torch.equal(kmax[:, 1:6], pages_k[:, 1:6].amax(2))
    resident = [store.tables[0].layers[1][i] for i in (0, 6, 7)]

    def check(picked, picks):
        assert len(picked) == 2 + len(resident)
        got = store.k.view(2, -1, 4, 4)[:, picked]  # [Hkv, page, token, D]
        for h, want in enumerate(picks):  # each head holds its own picks, in some order
            assert {_page_of(got[h, j], pages_k[h]) for j in range(2)} == set(want)
        assert torch.equal(got[:, 2:], pages_k[:, [0, 6, 7]])  # then the resident pages, in order
        assert torch.equal(store.v.view(2, -1, 4, 4)[:, picked[2:]], pages_k[:, [0, 6, 7]] + 100)

    h2d = store.memory_report().h2d_bytes
    picks = [[1, 2], [4, 5]]
    picked = policy.fetch_heads(store, 0, 1, torch.tensor(picks), resident)
    check(picked, picks)
    assert (store.hits.value, store.misses.value) == (0, 4)
    head_page = PAGE_BYTES // 2  # K and V of one page of one head
    assert store.memory_report().h2d_bytes - h2d == 4 * head_page
    picks = [[3, 1], [4, 5]]  # head 0 swaps page 2 for 3; head 1 keeps both
    again = policy.fetch_heads(store, 0, 1, torch.tensor(picks), resident)
    assert again == picked  # the same device pages
    check(again, picks)
    assert (store.hits.value, store.misses.value) == (3, 5)
    assert store.memory_report().h2d_bytes - h2d == 5 * head_page  # only the new pick crossed
    picks = [[5, 2], [1, 3]]  # head 0 swaps both; head 1 swaps both, for pages head 0 held
    assert policy.fetch_heads(store, 0, 1, torch.tensor(picks), resident) == picked
    check(picked, picks)
    assert (store.hits.value, store.misses.value) == (3, 9)
    assert policy.fetch_heads(store, 0, 1, torch.tensor([[2, 5], [3, 1]]), resident) == picked  # all held
    assert (store.hits.value, store.misses.value) == (7, 9)
    used = store.allocator.n_used
    policy.on_release(0)
    store.release(0)
    assert used > 0 and store.allocator.n_used == 0


def _page_of(block, pages):
    """Index of the page of ``pages`` [n, ps, D] equal to ``block`` [ps, D]."""
    (i,) = [i for i in range(len(pages)) if torch.equal(pages[i], block)]
    return i


def test_exported_state_restores_the_key_bounds_and_the_same_attention():
    torch.manual_seed(2)
    store, policy = _offloaded(*torch.randn(2, 2, N, 2, 4))
    q = torch.randn(1, 4, 4)
    before = [policy.run(layer, q, policy.plan(DecodeStep(store, [0], [N], 0.5))) for layer in range(2)]
    state = policy.export_state(0)
    assert sorted(state) == ["bounds.0", "bounds.1"] and state["bounds.0"].shape == (2, 2, N // PS, 4)
    policy.on_release(0)  # the policy's pages go; the KV stays
    assert policy.export_state(0) == {}
    policy.import_state(store, 0, state)
    assert torch.equal(torch.stack(policy.key_bounds(store, 0, 1)), state["bounds.1"])
    plan = policy.plan(DecodeStep(store, [0], [N], 0.5))
    for layer in range(2):
        torch.testing.assert_close(policy.run(layer, q, plan), before[layer])
    assert policy.stats(0)["state_bytes"] > 0


def test_the_window_is_a_16th_of_the_budget_unless_given():
    assert [QuestPolicy(token_budget=b).n_local for b in (153, 512, 1024, 4096)] == [16, 32, 64, 64]
    assert QuestPolicy(token_budget=153, n_local=38).n_local == 38
    assert QuestPolicy(token_budget=153).top_pages(8) == (153 - 4 - 16) // 8
    with pytest.raises(ValueError, match="below n_sink \\+ n_local \\(20\\)"):
        QuestPolicy(token_budget=19)


def test_small_selections_run_on_8_token_pages(tiny_model_dir):
    """Fewer than 32 picks of 16 tokens: the LLM takes quest's 8-token pages unless it is
    given a page size; larger selections, and other policies, keep 16."""
    from hetero import LLM
    from hetero.policies.quest import FINE_PAGES_BELOW

    small = dict(token_budget=4 + 64 + 16 * (FINE_PAGES_BELOW - 1), n_local=64)
    assert QuestPolicy(**small).page_size == 8
    assert QuestPolicy(token_budget=small["token_budget"] + 16, n_local=64).page_size == 16 == QuestPolicy().page_size
    with LLM(tiny_model_dir, device="cpu", policy="quest", policy_params=small) as llm:
        assert llm.store.page_size == 8
    with LLM(tiny_model_dir, device="cpu", policy="quest", policy_params=small, page_size=16) as llm:
        assert llm.store.page_size == 16
    with LLM(tiny_model_dir, device="cpu", policy="streaming") as llm:
        assert llm.store.page_size == 16
    with pytest.raises(ValueError, match="prefill_chunk"):
        LLM(tiny_model_dir, device="cpu", policy="quest", policy_params=small, prefill_chunk=12)
