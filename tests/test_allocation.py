"""Allocation of per-layer pruning: pure functions on plain numbers."""

from __future__ import annotations

import pytest

from gqa_prune.allocation import continuous_rates, discretize, layer_pressure, removal_options, split_by_steps
from gqa_prune.errors import GqaPruneError

IMPORTANCE = [0.9, 0.1, 0.2, 0.4, 0.05, 0.3]


def test_inverse_pressure_falls_as_importance_rises_and_alpha_sets_contrast():
    pressure = layer_pressure(IMPORTANCE, "inverse", 1.0)
    order_by_importance = sorted(range(6), key=IMPORTANCE.__getitem__)
    assert [pressure[i] for i in order_by_importance] == sorted(pressure, reverse=True)
    assert layer_pressure(IMPORTANCE, "inverse", 0.0) == [1.0] * 6
    assert layer_pressure(IMPORTANCE, "uniform", 2.0) == [1.0] * 6
    proportional = layer_pressure(IMPORTANCE, "proportional", 1.0)
    assert [proportional[i] for i in order_by_importance] == sorted(proportional)
    strong = layer_pressure(IMPORTANCE, "inverse", 2.0)
    assert max(strong) / min(strong) > max(pressure) / min(pressure)


def test_negative_removal_scores_are_shifted_not_inverted():
    pressure = layer_pressure([-0.1, 0.0, 0.5], "inverse", 1.0)
    assert pressure[0] > pressure[1] > pressure[2]


@pytest.mark.parametrize("target", [0.1, 0.3, 0.55])
def test_continuous_rates_hit_the_target_within_bounds(target):
    units = [4, 4, 8, 4, 4, 4]
    prunable = [True, True, True, True, False, True]
    rates = continuous_rates(
        layer_pressure(IMPORTANCE, "inverse", 1.0), units, prunable, target, 0.05, 0.8, "attention"
    )
    assert sum(rate * n for rate, n in zip(rates, units)) == pytest.approx(target * sum(units), rel=1e-9)
    assert rates[4] == 0.0
    assert all(0.05 <= rate <= 0.8 for rate, ok in zip(rates, prunable) if ok)


def test_impossible_targets_name_the_limit():
    with pytest.raises(GqaPruneError, match="attention ratio 0.7 is infeasible: with max_rate 0.5"):
        continuous_rates([1.0] * 4, [4] * 4, [True] * 4, 0.7, 0.0, 0.5, "attention")
    with pytest.raises(GqaPruneError, match="MLP ratio 0.05 is below what min_rate 0.2 already removes"):
        continuous_rates([1.0] * 4, [4] * 4, [True] * 4, 0.05, 0.2, 0.5, "MLP")
    assert continuous_rates([1.0] * 4, [4] * 4, [True] * 4, 0.0, 0.2, 0.5, "MLP") == [0.0] * 4


def test_removal_options_keep_multiples_and_at_least_one_unit():
    assert removal_options(1536, 128, 1536, 128) == list(range(0, 1409, 128))
    assert removal_options(100, 32, 100, 32) == [0, 4, 36, 68]  # kept widths 100, 96, 64, 32
    assert removal_options(3, 1, 3, 1) == [0, 1, 2]  # a GQA layer keeps at least one group
    assert removal_options(3, 1, 1.5, 1) == [0, 1]  # max_rate caps what a layer may lose
    assert removal_options(64, 128, 64, 128) == [0]  # narrower than one multiple: cannot be pruned


def test_discretize_meets_the_goal_exactly_when_steps_allow():
    # SmolLM2 attention: 30 layers of 3 groups; 20 % = 18 groups
    desired = [0.6 + 0.01 * (i % 5) for i in range(30)]
    desired = [d * 18 / sum(desired) for d in desired]
    choice = discretize(desired, [[0, 1, 2]] * 30, 18, uniform=False)
    assert sum(choice) == 18 and all(0 <= c <= 2 for c in choice)
    # the layers that got a group removed are those that asked for the most
    assert min(d for d, c in zip(desired, choice) if c) >= max(d for d, c in zip(desired, choice) if not c)


def test_uniform_rounds_each_layer_to_its_nearest_option():
    assert discretize([0.6] * 4, [[0, 1, 2]] * 4, 2.4, uniform=True) == [1, 1, 1, 1]
    assert discretize([307.2] * 3, [list(range(0, 1409, 128))] * 3, 921.6, uniform=True) == [256] * 3


def test_split_by_steps_takes_the_cheapest_parameters_first_and_lands_within_half_a_step():
    """Two candidates of different step sizes: "a" (steps of 10 parameters) costs 1 nat per parameter, "b"
    (steps of 4) 0.5 up to 8 parameters and 3 after. Of 30 parameters b's cheap 8 go first, then a's 20; of the
    2 left, b's next step (4, dearer than a's but only half over) is taken and a's (10) is not."""
    curves = {"a": lambda p: 1.0 * p, "b": lambda p: 0.5 * p if p <= 8 else 4 + 3 * (p - 8)}
    steps = {"a": [10, 20, 30, 40], "b": [4, 8, 12, 16]}
    assert split_by_steps(curves, steps, 30) == {"a": 2, "b": 3}
    assert split_by_steps(curves, steps, 34) == {"a": 3, "b": 2}  # 6 left after a's second: a's third fits half
    assert split_by_steps(curves, steps, 0) == {"a": 0, "b": 0}
    assert split_by_steps(curves, steps, 1000) == {"a": 4, "b": 4}  # every step, no more
    assert split_by_steps({"a": curves["a"]}, {"a": []}, 30) == {"a": 0}  # nothing to give


def test_a_whole_is_priced_by_what_it_adds_to_its_parts_taken_so_far_and_closes_them():
    """ "layer" (one step of 20 parameters, loss 2) contains "a" (steps of 5 parameters, 0.05 nats per parameter
    up to 10, then 0.5); "b" (steps of 10) costs 0.12 per parameter. For 20 parameters: a's two cheap steps
    (10 parameters, 0.5 nats), then the layer adds 10 more parameters for 1.5 nats (0.15 per parameter) and b
    10 for 1.2 (0.12): b is cheaper and the layer stays. Made cheaper (loss 1.4: 0.09 per parameter once a's
    steps are taken) the layer goes instead of b, and a takes no further step (and counts none: the layer holds
    it). A whole inside a whole (a sublayer in its layer) is a part like any other."""
    a = lambda p: 0.05 * p if p <= 10 else 0.5 + 0.5 * (p - 10)  # noqa: E731
    steps = {"a": [5, 10, 15], "b": [10, 20], "layer": [20]}
    curves = {"a": a, "b": lambda p: 0.12 * p, "layer": lambda p: 2.0}
    assert split_by_steps(curves, steps, 20, {"layer": ["a"]}) == {"a": 2, "b": 1, "layer": 0}
    curves["layer"] = lambda p: 1.4
    assert split_by_steps(curves, steps, 20, {"layer": ["a"]}) == {"a": 0, "b": 0, "layer": 1}
    assert split_by_steps(curves, steps, 40, {"layer": ["a"]}) == {"a": 0, "b": 2, "layer": 1}  # a stays closed
    # "half" (a sublayer: 10 parameters for 0.2 nats, 0.02 per parameter) holds b and goes first; then a's two
    # cheap steps. A cheap layer (0.5 nats) instead adds 10 parameters to half's for 0.3 nats (0.03 per
    # parameter, below a's 0.05) and goes, holding half and a.
    curves = {"a": a, "b": lambda p: 0.12 * p, "half": lambda p: 0.2, "layer": lambda p: 5.0}
    steps = {"a": [5, 10, 15], "b": [10, 20], "half": [10], "layer": [20]}
    wholes = {"half": ["b"], "layer": ["a", "b", "half"]}
    assert split_by_steps(curves, steps, 20, wholes) == {"a": 2, "b": 0, "half": 1, "layer": 0}
    curves["layer"] = lambda p: 0.5
    assert split_by_steps(curves, steps, 20, wholes) == {"a": 0, "b": 0, "half": 0, "layer": 1}
