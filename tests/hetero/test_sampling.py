import pytest
import torch

from hetero.sampling import SamplingParams, make_generator, sample


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_keyword_raises():
    with pytest.raises(TypeError):
        SamplingParams(temprature=1.0)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="\n").stop == ["\n"]


def _logits():
    return torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def test_greedy_is_argmax():
    p = SamplingParams()
    assert sample(_logits(), p, make_generator(p, torch.device("cpu"))) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    for p in (SamplingParams(temperature=1.0, top_k=1, seed=0),
              SamplingParams(temperature=1.0, top_p=1e-6, seed=0)):
        g = make_generator(p, torch.device("cpu"))
        assert {sample(_logits(), p, g) for _ in range(50)} == {1}


def test_top_k_and_top_p_restrict_the_support():
    p = SamplingParams(temperature=5.0, top_k=2, seed=1)
    g = make_generator(p, torch.device("cpu"))
    assert {sample(_logits(), p, g) for _ in range(200)} == {1, 2}
    # probabilities at T=1: ~[.03,.50,.45,.01,.07]; top_p=0.9 keeps tokens 1 and 2 only
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1)
    g = make_generator(p, torch.device("cpu"))
    assert {sample(_logits(), p, g) for _ in range(300)} == {1, 2}


def test_seed_reproduces_and_frequencies_follow_softmax():
    p = SamplingParams(temperature=1.0, seed=123)
    draws = [sample(_logits(), p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(4000)]
    again = [sample(_logits(), p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(4000)]
    assert draws == again
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert torch.allclose(freq, _logits().softmax(-1), atol=0.03)
