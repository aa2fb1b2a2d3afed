"""Iterative pruning: one round is the one-shot recipe exactly; k rounds reach the target, re-scoring each time."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import calibration_ids, tiny_model

from gqa_prune import importance
from gqa_prune.arch import geometry_of
from gqa_prune.errors import SettingError
from gqa_prune.iterative import prune_iteratively, step_ratio
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.reconstruct import reconstruct
from gqa_prune.surgery import apply_plan

SETTINGS = PlanSettings(channel_multiple=8)  # the default mode (hybrid) with MLP widths a tiny model has
OPTIONS = dict(batch_size=2, channel_multiple=8)


def test_round_shares_remove_equal_parts_of_the_original():
    # 20 % in two rounds of a 1000-parameter model: 100 of 1000, then 100 of the 900 left
    assert step_ratio(1000, 1000, 0.2, 1, 2) == pytest.approx(0.1)
    assert step_ratio(1000, 900, 0.2, 2, 2) == pytest.approx(100 / 900)
    # a round that overshot leaves the next one less to do, never a negative share
    assert step_ratio(1000, 850, 0.2, 2, 2) == pytest.approx(50 / 850)
    assert step_ratio(1000, 700, 0.2, 2, 2) == 0.0


def test_one_round_is_the_one_shot_recipe():
    model = tiny_model("llama", 3, layers=4)
    blocks = calibration_ids(blocks=4, length=24)
    one_shot = copy.deepcopy(model)
    scores = importance.score(copy.deepcopy(one_shot), blocks, "taylor", **OPTIONS)
    plan = build_plan(scores, PlanSettings(ratio=0.3, channel_multiple=8))
    plan, _ = reconstruct(one_shot, plan, blocks)
    apply_plan(one_shot, plan)

    result = prune_iteratively(model, blocks, 0.3, 1, plan_settings=SETTINGS, **OPTIONS)
    assert result.plans[0].to_dict()["layers"] == plan.to_dict()["layers"]
    ids = calibration_ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, one_shot(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [2, 3])
def test_rounds_reach_the_target_rescoring_the_pruned_model(steps, monkeypatch):
    model = tiny_model("qwen3", 2, layers=4)
    original = geometry_of(model).unit_params()
    blocks = calibration_ids(blocks=4, length=24)
    scored = []
    real_score = importance.score

    def recording_score(model, *args, **kwargs):
        scored.append(geometry_of(model))
        return real_score(model, *args, **kwargs)

    monkeypatch.setattr("gqa_prune.iterative.score", recording_score)
    result = prune_iteratively(model, blocks, 0.4, steps, plan_settings=SETTINGS, **OPTIONS)
    assert len(result.plans) == len(scored) == steps
    # every round after the first scores the model the rounds before it left
    for plan, next_geometry in zip(result.plans, scored[1:]):
        assert plan.pruned_geometry().kv_groups == tuple(g for g in next_geometry.kv_groups)
    removed = 1 - geometry_of(result.model).unit_params() / original
    step = 8 * geometry_of(result.model).params_per_channel * steps / original  # granularity: a channel block a round
    assert removed == pytest.approx(0.4, abs=max(step, 0.05))
    with torch.no_grad():
        assert torch.isfinite(result.model(calibration_ids(seed=5)).logits).all()


@pytest.mark.parametrize("steps", [0, -1, 17, 2.0, True, "2"])
def test_bad_round_counts_are_refused_naming_the_value(steps):
    with pytest.raises(SettingError, match="^" + re.escape(f"steps {steps!r} must be an integer from 1 to 16") + "$"):
        prune_iteratively(tiny_model("llama", 1), calibration_ids(), 0.2, steps)
