"""End-to-end: LLM.generate / stream / logprobs against HF transformers on a tiny model."""

import pytest
import torch

from hetero import LLM, SamplingParams

TEXT = ("The GNU General Public License is a free, copyleft license for software and other "
        "kinds of works. The licenses for most software are designed to take away your freedom.")


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16,
               device_kv_budget="8MiB")


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk, page", [(12, 4), (16, 16), (1024, 8)])
def test_prefill_logprobs_match_hf(tiny_model_dir, tiny_hf_model, chunk, page):
    llm = LLM(tiny_model_dir, device="cpu", page_size=page, prefill_chunk=chunk)
    out = llm.logprobs(TEXT)
    ref = _hf_logprobs(tiny_hf_model, out.token_ids)
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=1e-4)
    assert llm.store.allocator.n_used == 0  # nothing left behind


def test_greedy_generate_matches_hf(llm, tiny_hf_model):
    ids = llm.tokenizer(TEXT)["input_ids"]
    (out,) = llm.generate(TEXT, SamplingParams(max_new_tokens=24, ignore_eos=True))
    ref = tiny_hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 min_new_tokens=24)[0, len(ids):].tolist()
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    s = out.stats
    assert s.prompt_tokens == len(ids) and s.generated_tokens == 24
    assert s.ttft_s > 0 and s.decode_tokens_per_s > 0
    assert 0 < s.device_kv_bytes_peak <= s.device_kv_budget
    assert s.h2d_bytes == 0 and s.d2h_bytes == 0  # dense, all resident


def test_batch_equals_one_by_one(llm):
    prompts = [TEXT, "Short prompt.", TEXT[:50]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batch = llm.generate(prompts, params)
    single = [llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in batch] == [o.token_ids for o in single]
    assert llm.store.allocator.n_used == 0


def test_stream_pieces_make_the_generated_text(llm):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    pieces = list(llm.stream(TEXT, params))
    (out,) = llm.generate(TEXT, params)
    assert len(pieces) > 1 and "".join(pieces) == out.text


def test_stop_string_ends_generation(llm):
    (free,) = llm.generate(TEXT, SamplingParams(max_new_tokens=16, ignore_eos=True))
    stop = free.text[3:6]
    (out,) = llm.generate(TEXT, SamplingParams(max_new_tokens=16, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate(TEXT, params)[0].token_ids
    b = llm.generate(TEXT, params)[0].token_ids
    assert a == b


def test_context_limit_caps_generation(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", max_model_len=40)
    ids = llm.tokenizer(TEXT)["input_ids"][:30]
    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 10


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ("", {}, "non-empty"),
        ([], {}, "no prompts"),
        ("word " * 600, {}, "context limit"),
        ([10**9], {}, "token ids"),
    ],
)
def test_bad_prompts_raise_and_leave_nothing(llm, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, SamplingParams(), **kwargs)
    assert llm.store.allocator.n_used == 0 and not llm.store.tables


def test_budget_too_small_for_the_batch_raises_and_frees(tiny_model_dir):
    # 2 layers * 2 kv heads * 16 dims * 2 (K, V) * 4 bytes = 512 B per token
    llm = LLM(tiny_model_dir, device="cpu", page_size=4, device_kv_budget=512 * 64)
    params = SamplingParams(max_new_tokens=8)
    with pytest.raises(ValueError, match="device_kv_budget"):
        llm.generate([TEXT, TEXT], params)
    assert llm.store.allocator.n_used == 0 and not llm.store.tables
    assert llm.generate("Hi there", params)[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "nope"}, "unknown policy"),
        ({"backend": "spark"}, "unknown backend 'spark'; available: local, ray"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device_kv_budget": "lots"}, "size"),
        ({"page_size": 12}, "power of two"),
    ],
)
def test_bad_llm_arguments(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model_dir, **kwargs)


def test_the_facade_hands_its_parts_to_the_scheduler(llm):
    s = llm.scheduler
    assert (s.engine, s.store, s.policy, s.tokenizer) == (llm.engine, llm.store, llm.policy, llm.tokenizer)
    assert llm.engine.store is llm.store and llm.eos_ids == s.eos_ids


def test_memory_report_and_context_manager(tiny_model_dir):
    with LLM(tiny_model_dir, device="cpu") as llm:
        llm.generate("Hello", SamplingParams(max_new_tokens=2))
        rep = llm.memory_report()
    assert set(rep) >= {"device_kv_budget", "device_kv_bytes_peak", "host_kv_bytes", "h2d_bytes"}
    assert rep["device_kv_bytes"] == 0


def test_a_dense_batch_that_fits_exactly_is_admitted(tiny_model_dir):
    probe = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16)
    n = len(probe.tokenizer(TEXT)["input_ids"]) + 8
    pages = 2 * 2 * -(-n // 4)  # two sequences, two layers
    llm = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16,
              device_kv_budget=pages * probe.store.page_bytes)
    outs = llm.generate([TEXT, TEXT], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8, 8]
    assert outs[0].stats.device_kv_bytes_peak == llm.store.budget
