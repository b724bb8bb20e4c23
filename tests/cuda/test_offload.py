"""The offload path on a CUDA device: copies through the copy stream land before anything
reads them, offloaded prefill and decode equal dense in place, and the device pool takes
only what requests use. Marked ``cuda`` (tests/cuda/conftest.py): ``make test-cuda``."""

import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.device import Device

DEVICE = "cuda"
TEXT = open("/usr/share/common-licenses/GPL-3").read()[:6000]
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
# the tiny model was "trained" to 512 positions; its random weights do not care
COMMON = dict(device=DEVICE, page_size=16, max_model_len=2048)


def _busy(device: torch.device, n: int = 8) -> None:
    """Queue seconds' worth of matmuls on the compute stream, so copies ordered after it
    land late and a reader that does not wait sees stale memory."""
    a = torch.randn(4096, 4096, device=device)
    for _ in range(n):
        a = a @ a
        a /= a.norm()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_tier_round_trip(busy, dtype):
    cfg = ModelConfig(vocab_size=32, hidden_size=512, intermediate_size=1024, n_layers=4, n_heads=32,
                      n_kv_heads=8, head_dim=64)
    ps, n = 16, 4096
    dev = Device(torch.device(DEVICE))
    store = KVStore(cfg, dev, dtype, ps, 256 << 20)
    store.admit(0, n, offload=True)
    store.reserve(0, n)
    slots = store.slots(0, 0, n)
    ref = []
    for layer in range(cfg.n_layers):
        k = torch.randn(n, cfg.n_kv_heads, cfg.head_dim, device=DEVICE, dtype=dtype)
        store.write(slots[layer], k, k + 1)
        ref.append(k.transpose(0, 1).cpu())
    pages = list(range(1, n // ps - 4))
    if busy:
        _busy(dev.device)
    for layer in range(cfg.n_layers):
        store.offload(0, layer, pages)
    host = store.host_tier(0)  # waits for the copies, never a sync of the whole device
    assert host.is_pinned()
    lo, hi = pages[0] * ps, (pages[-1] + 1) * ps
    for layer in range(cfg.n_layers):
        assert torch.equal(host[layer, 0, :, lo:hi], ref[layer][:, lo:hi])
        assert torch.equal(host[layer, 1, :, lo:hi], ref[layer][:, lo:hi] + 1)
    if busy:
        _busy(dev.device)
    got = store.fetch(0, 1, pages[:8], 8)  # host → device on the copy stream
    fetched = store.k.view(cfg.n_kv_heads, -1, ps, cfg.head_dim)[:, got].reshape(cfg.n_kv_heads, -1, cfg.head_dim)
    assert torch.equal(fetched.cpu(), ref[1][:, lo : lo + 8 * ps])
    rep = store.memory_report()
    assert rep.d2h_bytes == cfg.n_layers * len(pages) * store.page_bytes
    assert rep.h2d_bytes == 8 * store.page_bytes


def test_llm_takes_no_kv_memory_until_a_request_needs_it(tiny_model_dir):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm = LLM(tiny_model_dir, device=DEVICE)  # the default budget: 80% of free memory
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert llm.store.budget > 1 << 30
    assert torch.cuda.memory_allocated() - before <= weights + (16 << 20)
    (out,) = llm.generate(TEXT[:2000], GREEDY)
    rep = llm.memory_report()
    assert 0 < rep["device_pool_bytes"] < 64 << 20 and out.stats.device_kv_bytes_peak <= rep["device_pool_bytes"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", device_kv_budget="64MiB", **COMMON)
    ids = llm.tokenizer(TEXT)["input_ids"][:1500]
    return ids, llm.generate(ids, GREEDY)[0], llm.logprobs(TEXT[:3000])


@pytest.mark.parametrize("stream", [False, True], ids=["whole-layer", "streamed"])
def test_offloaded_dense_equals_dense_in_place(tiny_model_dir, reference, stream):
    """Budgets that hold one layer's whole KV beside the resident sets, or not (the layer's
    prior KV streams back through the prefill kernel)."""
    ids, ref, ref_lp = reference
    params = {"n_sink": 16, "n_local": 64, "stream_pages": 16}
    probe = LLM(tiny_model_dir, dtype="float32", policy="dense", policy_params=params, **COMMON)
    n, cfg, chunk = len(ids) + GREEDY.max_new_tokens, probe.config, probe.engine.prefill_chunk
    pages = probe.policy.device_pages(cfg, n, 16, chunk, stream_prefill=stream)
    assert pages < cfg.n_layers * -(-n // 16)  # the whole KV does not fit: it offloads
    llm = LLM(tiny_model_dir, dtype="float32", policy="dense", policy_params=params,
              device_kv_budget=pages * probe.store.page_bytes, **COMMON)
    (out,) = llm.generate(ids, GREEDY)
    assert out.token_ids == ref.token_ids
    s = out.stats
    assert s.d2h_bytes > 0 and s.h2d_bytes > 0 and s.device_kv_bytes_peak <= s.device_kv_budget
    lp = llm.logprobs(TEXT[:3000])
    torch.testing.assert_close(torch.tensor(lp.logprobs), torch.tensor(ref_lp.logprobs), atol=1e-3, rtol=1e-3)
    assert llm.store.allocator.n_used == 0


@pytest.mark.parametrize("policy, params", [
    ("streaming", {"n_sink": 16, "n_local": 2048}),
    ("quest", {"n_sink": 16, "n_local": 64, "token_budget": 4096, "dense_layers": 0}),
    ("magicpig", {"n_sink": 16, "n_local": 64, "lsh_k": 0, "lsh_l": 2, "dense_layers": 0}),
])
def test_sparse_policies_that_cover_everything_equal_dense(tiny_model_dir, reference, policy, params):
    ids, ref, _ = reference
    llm = LLM(tiny_model_dir, dtype="float32", policy=policy, policy_params=params,
              device_kv_budget="64MiB", **COMMON)
    (out,) = llm.generate(ids, GREEDY)
    assert out.token_ids == ref.token_ids


@pytest.mark.parametrize("policy", ["quest", "streaming", "magicpig"])
def test_sparse_policies_offload_in_bf16_within_budget(tiny_model_dir, policy):
    params = {"quest": {"token_budget": 256}, "streaming": {}, "magicpig": {}}[policy]
    llm = LLM(tiny_model_dir, policy=policy, device_kv_budget="1MiB",
              policy_params={"n_sink": 16, "n_local": 64, "dense_layers": 0, **params}, **COMMON)
    assert llm.dtype == torch.bfloat16  # the CUDA default
    (out,) = llm.generate(TEXT, GREEDY)
    s = out.stats
    assert len(out.token_ids) == 16 and s.d2h_bytes > 0 and s.device_kv_bytes_peak <= s.device_kv_budget
    assert llm.store.allocator.n_used == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_reads_the_pinned_host_tier_from_the_device(dtype):
    """gather_head_pages on CUDA: the kernel reads pinned host memory directly (UVA)."""
    from gpu_kernels import gather_head_pages
    from tests.gpu_kernels.test_gather import _case, _oracle

    host, pool, src, dst, valid, ps = _case(3, hkv=8, ps=16, d=64, n_host=300, n_pool=64, k=20, dtype=dtype)
    want = _oracle(host, pool, src, dst, valid, ps)
    pinned, on_dev = host.pin_memory(), pool.to(DEVICE)
    gather_head_pages(pinned, on_dev, src.to(DEVICE), dst.to(DEVICE), valid.to(DEVICE), ps)
    assert torch.equal(on_dev.cpu(), want)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_quest_head_cache_right_after_an_offload_reads_what_landed(busy):
    """Pages offloaded behind a busy compute stream, then picked at once: the gather waits
    for the copy stream on the device, and the host never reads the picks."""
    from hetero.policies.quest import QuestPolicy

    cfg = ModelConfig(vocab_size=32, hidden_size=512, intermediate_size=1024, n_layers=2, n_heads=32,
                      n_kv_heads=8, head_dim=64)
    ps, n = 16, 4096
    store = KVStore(cfg, Device(torch.device(DEVICE)), torch.float32, ps, 256 << 20)
    store.admit(0, n, offload=True)
    store.reserve(0, n)
    slots = store.slots(0, 0, n)
    k = torch.randn(n, cfg.n_kv_heads, cfg.head_dim, device=DEVICE)
    store.write(slots[0], k, k + 1)
    ref = k.transpose(0, 1).cpu().view(cfg.n_kv_heads, -1, ps, cfg.head_dim)  # [Hkv, page, ps, D]
    pages = list(range(1, n // ps - 4))
    quest = QuestPolicy(n_sink=ps, n_local=ps, token_budget=2 * ps + 12 * ps, dense_layers=0)
    if busy:
        _busy(store.device.device)
    quest.on_offload(store, 0, 0, pages, store.offload(0, 0, pages))
    picks = torch.stack([torch.randperm(len(pages))[:12] + 1 for _ in range(cfg.n_kv_heads)]).to(DEVICE)
    picked = quest.fetch_heads(store, 0, 0, picks, [store.tables[0].layers[0][0]])
    got = store.k.view(cfg.n_kv_heads, -1, ps, cfg.head_dim)[:, picked[:12]].cpu()
    held = quest._seqs[0].heads[0].held.cpu()
    for h in range(cfg.n_kv_heads):
        assert sorted(held[h].tolist()) == sorted(picks[h].tolist())
        assert torch.equal(got[h], ref[h, held[h]])
    assert store.misses.value == 12 * cfg.n_kv_heads and store.hits.value == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_actqkv_on_the_device_equals_the_cpu(tiny_model_dir, dtype):
    """actqkv's windowed prefill and decode (the head cache's Triton gather, the prefill
    kernel over the memory, the local part in tensor ops) against its CPU path, past the
    tiny model's 512 trained positions; within the budget in bf16 too."""
    params = {"n_sink": 16, "n_local": 64, "window": 32, "top_blocks": 8, "min_blocks": 4}
    ids = (LLM(tiny_model_dir, device="cpu", device_kv_budget="1MiB").tokenizer(TEXT)["input_ids"] * 2)[:900]
    lps = [LLM(tiny_model_dir, device=d, dtype=dtype, page_size=16, policy="actqkv", policy_params=params,
               device_kv_budget="4MiB").logprobs(ids).logprobs for d in ("cpu", DEVICE)]
    diff = (torch.tensor(lps[1]) - torch.tensor(lps[0])).abs()
    assert diff.max() < 1e-3 if dtype == "float32" else diff.mean() < 0.1
    llm = LLM(tiny_model_dir, dtype=dtype, policy="actqkv", policy_params=params, device_kv_budget="4MiB",
              device=DEVICE, page_size=16)
    (out,) = llm.generate(ids, GREEDY)
    s = out.stats
    assert len(out.token_ids) == 16 and s.h2d_bytes > 0 and s.device_kv_bytes_peak <= s.device_kv_budget
    assert llm.store.allocator.n_used == 0
