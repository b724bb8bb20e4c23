"""The embedded SmolLM2-135M through the whole runtime, against HF transformers (fp32)."""

import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.loader import hf_reference_dir

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32", prefill_chunk=64)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_reference_dir(None), dtype=torch.float32).eval()


def test_greedy_chat_output_equals_hf_token_for_token(llm, hf):
    params = SamplingParams(max_new_tokens=24)
    outs = llm.generate(QUESTIONS, params, chat=True)  # as a batch
    for q, out in zip(QUESTIONS, outs):
        text = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        ids = llm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        if ref and ref[-1] in llm.eos_ids:
            ref = ref[:-1]
            assert out.finish_reason == "stop"
        assert out.token_ids == ref, (out.text, llm.tokenizer.decode(ref))
        assert out.text.strip()


def test_perplexity_of_real_text_matches_hf(llm, hf):
    text = open("/usr/share/common-licenses/Apache-2.0").read()[:3000]
    ours = llm.logprobs(text)
    with torch.no_grad():
        logits = hf(torch.tensor([ours.token_ids])).logits[0]
    ref = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ours.token_ids[1:])[:, None])
    torch.testing.assert_close(torch.tensor(ours.logprobs), ref[:, 0], atol=2e-3, rtol=1e-3)
    assert 1.0 < ours.perplexity < 50.0
