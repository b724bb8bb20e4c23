"""Where the chain prefill cuts the prompt: equal predicted time per worker, later parts
shorter; the even split; the cost model's fit."""

import pytest

from orchestrator.partition import CostModel, even_bounds, fit_cost_model, fitted_bounds, predicted_times

# the order of what one thread of this machine's class measures on SmolLM2-135M (s per
# token per layer, s per query-key pair per layer)
MODEL = CostModel(a=1.4e-4, b=4e-8)


@pytest.mark.parametrize("n", [4096, 8192, 16384])
@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_fitted_parts_take_equal_time_and_shrink_along_the_chain(n, workers):
    bounds = fitted_bounds(n, workers, MODEL)
    parts = [e - s for s, e in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == n and sum(parts) == n and min(parts) >= 1
    assert all(a >= b for a, b in zip(parts, parts[1:])), parts  # later parts see more keys
    assert parts[0] > parts[-1]
    times = predicted_times(bounds, MODEL)
    assert max(times) / min(times) <= 1.01, times


def test_the_even_split_is_unbalanced_under_the_same_model():
    times = predicted_times(even_bounds(8192, 4), MODEL)
    assert max(times) / min(times) > 2  # what the fitted cuts correct


def test_without_attention_cost_the_fitted_cuts_are_the_even_ones():
    assert fitted_bounds(1000, 4, CostModel(1e-4, 0.0)) == even_bounds(1000, 4) == [0, 250, 500, 750, 1000]
    assert fitted_bounds(7, 1, MODEL) == [0, 7]


def test_tiny_prompts_keep_a_token_per_worker():
    assert fitted_bounds(3, 3, CostModel(1e-6, 1.0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot be split over 4 workers"):
        fitted_bounds(3, 4, MODEL)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        even_bounds(10, 0)
    with pytest.raises(ValueError, match="a must be a finite number > 0"):
        CostModel(0.0, 1.0)


def test_the_fit_recovers_the_model_it_was_sampled_from():
    samples = [(n, c, MODEL.layer_time(n, c)) for n, c in [(512, 0), (512, 3584), (1536, 1024)]]
    fit = fit_cost_model(samples)
    assert fit.a == pytest.approx(MODEL.a, rel=1e-6) and fit.b == pytest.approx(MODEL.b, rel=1e-6)


def test_a_noisy_negative_attention_cost_is_fitted_as_zero():
    fit = fit_cost_model([(512, 0, 0.10), (512, 4096, 0.09)])
    assert fit.b == 0.0 and fit.a == pytest.approx(0.095 / 512, rel=0.05)
    with pytest.raises(ValueError, match="do not separate a from b"):
        fit_cost_model([(512, 0, 0.1), (512, 0, 0.11)])
