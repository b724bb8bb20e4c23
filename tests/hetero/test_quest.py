"""Quest's decode attention against a torch oracle: each KV head attends over the sinks, its
own top pages by the key-bound score, and the window, through the store's head cache."""

import torch

from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.device import Device
from hetero.policies import DecodeStep
from hetero.policies.quest import QuestPolicy

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


def test_quest_decode_attention_equals_the_top_pages_oracle_step_after_step():
    torch.manual_seed(0)
    store = KVStore(CFG, Device(torch.device("cpu")), torch.float32, PS, 64 * 2 * 2 * PS * 4 * 4)
    policy = QuestPolicy(n_sink=4, n_local=8, token_budget=4 + 8 + 3 * PS, dense_layers=0)
    table = store.admit(0, N, offload=True)
    store.reserve(0, N)
    k, v = torch.randn(2, N, 2, 4), torch.randn(2, N, 2, 4)  # [L, N, Hkv, D]
    slots = store.slots(0, 0, N)
    for layer in range(2):
        store.write(slots[layer], k[layer], v[layer])
    table.n_tokens, table.settled, table.sink_pages = N, N // PS - 2, policy.sink_pages(PS)
    for layer in range(2):
        store.offload(0, layer, list(range(1, table.settled)))
    step = DecodeStep(store, [0], [N], torch.full((1, 2), N, dtype=torch.int32), 0.5)
    for _ in range(4):  # new queries pick new pages: some stay in the head cache, some not
        q = torch.randn(1, 4, 4)
        for layer in range(2):
            out = policy.attend_decode(layer, q, step)
            ref = _oracle(q[0], k[layer].transpose(0, 1), v[layer].transpose(0, 1), policy, 0.5)
            torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    assert store.cache_hits > 0 and store.cache_misses > 0
    head_cache = 3 + 3 + 2  # top pages, copies of the 3 resident pages, spare
    # per layer: 3 resident KV pages, 4 metadata pages (16 pages of 4 descriptors), the cache
    assert store.allocator.n_used == 2 * (3 + 4 + head_cache)
