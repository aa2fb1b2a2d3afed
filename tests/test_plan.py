"""PruningPlan: JSON round-trip, determinism, validation, allocation properties on real scores."""

from __future__ import annotations

import json

import pytest
from helpers import calibration_ids, parameter_count, plan_for, tiny_model

from gqa_prune import importance
from gqa_prune.errors import GqaPruneError
from gqa_prune.planning import PlanSettings, PruningPlan, build_plan


@pytest.fixture(scope="module")
def scores():
    return importance.score(tiny_model("llama", 3, layers=6), calibration_ids(), "taylor")


def _plan(scores, **settings):
    settings.setdefault("channel_multiple", 8)
    settings.setdefault("attn_ratio", 0.3)
    settings.setdefault("mlp_ratio", 0.3)
    return build_plan(scores, PlanSettings(**settings), params_before=100_000)


def test_json_round_trip_is_exact(tmp_path, scores):
    plan = _plan(scores, protected_layers=(0, 5), alpha=1.5)
    assert PruningPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.json").read_text() == plan.to_json()
    assert PruningPlan.load(tmp_path / "plan.json").to_json() == plan.to_json()
    assert json.loads(plan.to_json())["summary"]["params_after"] == plan.params_after


def test_the_library_plans_from_scores_alone():
    """importance.score records what build_plan needs (the parameter count): no CLI threading."""
    model = tiny_model("llama", 3, layers=4)
    scores = importance.score(model, calibration_ids(), "taylor", curves=False)
    plan = build_plan(scores, PlanSettings(ratio=0.3, mode="width", channel_multiple=8))
    assert plan.params_before == parameter_count(model)
    assert 0 < plan.params_after < plan.params_before


def test_plans_are_deterministic_for_a_fixed_seed():
    model = tiny_model("qwen2", 3, layers=4)
    blocks = calibration_ids()
    plans = [
        build_plan(importance.score(model, blocks, criterion, seed=seed), PlanSettings(0.5, 0.5, channel_multiple=8), 1)
        for criterion, seed in (("random", 11), ("random", 11), ("random", 12), ("taylor", 0), ("taylor", 0))
    ]
    assert plans[0].to_json() == plans[1].to_json()
    assert plans[0].to_json() != plans[2].to_json()
    assert plans[3].to_json() == plans[4].to_json()


def test_protected_layers_keep_everything_and_widths_are_multiples(scores):
    plan = _plan(scores, protected_layers=(0, 5), attn_ratio=0.5, mlp_ratio=0.5)
    for layer in plan.layers:
        assert len(layer.kept_mlp_channels) % 8 == 0
        assert len(layer.kept_kv_groups) >= 1
    assert len(plan.layers[0].kept_kv_groups) == 4 and len(plan.layers[5].kept_mlp_channels) == 64


def test_inverse_prunes_important_layers_less(scores):
    plan = _plan(scores, attn_ratio=0.4, mlp_ratio=0.4, alpha=2.0)
    by_importance = sorted(plan.layers, key=lambda layer: layer.importance)
    rates = [layer.mlp_rate for layer in by_importance]
    assert rates == sorted(rates, reverse=True)
    assert plan.param_summary()["achieved_mlp_ratio"] == pytest.approx(0.4, abs=8 * 3 / 64 / 6)


def test_separate_ratios_either_may_be_zero(scores):
    attention_only = _plan(scores, attn_ratio=0.5, mlp_ratio=0.0)
    assert all(len(layer.kept_mlp_channels) == 64 for layer in attention_only.layers)
    assert attention_only.param_summary()["achieved_attn_ratio"] == 0.5
    mlp_only = _plan(scores, attn_ratio=0.0, mlp_ratio=0.25)
    assert all(len(layer.kept_kv_groups) == 4 for layer in mlp_only.layers)


def test_every_layer_keeps_a_kv_group_even_when_pushed(scores):
    plan = _plan(scores, attn_ratio=0.7, max_rate=0.95)
    assert all(len(layer.kept_kv_groups) >= 1 for layer in plan.layers)
    with pytest.raises(GqaPruneError, match="attention ratio 0.9 is infeasible"):
        _plan(scores, attn_ratio=0.9, max_rate=0.5)


def test_uniform_plan_keeps_every_layer_the_same_shape(scores):
    assert _plan(scores, strategy="uniform", attn_ratio=0.2, mlp_ratio=0.35).is_uniform


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval_is_refused(scores, ratio):
    with pytest.raises(GqaPruneError, match=r"outside \[0, 1\)"):
        _plan(scores, attn_ratio=ratio)


def test_settings_errors_name_the_value(scores):
    with pytest.raises(GqaPruneError, match="strategy 'greedy' is not one of inverse, proportional, uniform"):
        _plan(scores, strategy="greedy")
    with pytest.raises(GqaPruneError, match="protected layer 9 does not exist: the model has layers 0..5"):
        _plan(scores, protected_layers=(9,))
    with pytest.raises(GqaPruneError, match="layer criterion 'removal' was not computed by the importance stage"):
        _plan(scores, layer_criterion="removal")


def test_a_plan_that_would_empty_a_layer_is_refused(scores):
    data = json.loads(_plan(scores).to_json())
    data["layers"][1]["kept"]["gqa_group"] = []
    with pytest.raises(
        GqaPruneError, match="layer 1: kept gqa_group is empty: a layer that keeps this sublayer must keep"
    ):
        PruningPlan.from_dict(data)
    data = json.loads(_plan(scores).to_json())
    data["layers"][2]["kept"]["mlp_channel"] = [5, 3]
    with pytest.raises(GqaPruneError, match="layer 2: kept mlp_channel must be sorted, unique indices in 0..63"):
        PruningPlan.from_dict(data)


def test_edited_plan_summary_is_refused(scores):
    data = json.loads(_plan(scores).to_json())
    data["layers"][3]["kept"]["mlp_channel"] = data["layers"][3]["kept"]["mlp_channel"][:-1]
    with pytest.raises(GqaPruneError, match="plan summary does not match its kept indices"):
        PruningPlan.from_dict(data)


def test_param_prediction_matches_a_real_model():
    model = tiny_model("qwen3", 4)
    plan = plan_for(model)
    from gqa_prune.surgery import apply_plan

    assert parameter_count(apply_plan(model, plan)) == plan.params_after
