"""Fidelity on the embedded model: quest beats streaming at the same token budget, and a
needle in ~1.25k tokens is found with a 10% budget as dense attention finds it."""

import pytest

from hetero import LLM, SamplingParams
from hetero.probe import attention_error

FILLER = open("/usr/share/common-licenses/GPL-3").read()


def _needle_prompt(depth: float, key: str = "68213") -> str:
    hay = FILLER[:5500]
    cut = int(len(hay) * depth)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    return hay[:cut] + needle + hay[cut:] + "\n\nWhat is the pass key? The pass key is"


def _llm(policy, **params):
    return LLM(device="cpu", policy=policy, policy_params=params, device_kv_budget="128MiB",
               prefill_chunk=512)


@pytest.mark.parametrize("depth", [0.3, 0.5, 0.7])
def test_needle_quest_at_ten_percent_answers_as_dense(depth):
    prompt = _needle_prompt(depth)
    params = SamplingParams(max_new_tokens=6)
    (dense,) = _llm("dense").generate(prompt, params)
    (quest,) = _llm("quest", token_budget=125, n_sink=4, n_local=32).generate(prompt, params)
    assert "68213" in dense.text
    assert quest.text == dense.text
    assert quest.stats.prompt_tokens * 0.1 >= 125
    assert quest.stats.h2d_bytes_per_token > 0  # it did fetch pages


def test_quest_error_is_below_streaming_at_the_same_budget():
    # both keep the first two layers exact; errors are measured over the other 28
    llm = _llm("dense")
    ids = llm.tokenizer(FILLER)["input_ids"][:2048]
    budget, n_sink = 256, 4
    quest = attention_error(
        _llm("quest", token_budget=budget, n_sink=n_sink, dense_layers=2), ids, skip_layers=2
    )
    stream = attention_error(
        _llm("streaming", n_sink=n_sink, n_local=budget - n_sink, dense_layers=2), ids, skip_layers=2
    )
    # measured: 0.22 against 0.32 (an oracle page top-k reaches 0.17 at this budget)
    assert quest < 0.8 * stream, (quest, stream)
    assert 0 < quest and stream < 1.0
