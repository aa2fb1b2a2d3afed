"""Iterative pruning: reach the target in ``steps`` rounds of score -> plan -> refit -> slice.

A one-shot plan is decided from scores of the dense model, although removals compound: after the first
removals (and the refit that follows them) the remaining units matter differently, and the loss curves the
hybrid plan prices kinds with were measured on a model that no longer exists. Each round here scores the model
pruned and refit so far, so the next round's plan sees what the earlier ones did. Round ``i`` of ``k`` brings
the attention+MLP parameters to ``1 - ratio * i / k`` of the original model's (equal removal per round).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from .allocation import check_rate_bounds
from .arch import geometry_of
from .errors import SettingError
from .importance import score
from .planning import PruningPlan, build_plan
from .reconstruct import reconstruct
from .scores import Scores
from .settings import PlanSettings, ReconstructionSettings
from .surgery import apply_plan

logger = logging.getLogger(__name__)

MAX_STEPS = 16


@dataclass(frozen=True)
class IterativeResult:
    """The pruned model and, per round, the plan as applied (indices of that round's model) and its target."""

    model: nn.Module
    plans: tuple[PruningPlan, ...]
    step_ratios: tuple[float, ...]  # fraction of that round's attention+MLP parameters removed


def step_ratio(original: int, current: int, ratio: float, step: int, steps: int) -> float:
    """Fraction of the current model's attention+MLP parameters round ``step`` (1-based) removes so that, after
    it, ``ratio * step / steps`` of the original model's are gone."""
    target = original * (1 - ratio * step / steps)
    return max(0.0, (current - target) / current)


def check_steps(steps: object) -> int:
    """Refuse a round count that is not an integer in [1, MAX_STEPS], naming the value."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SettingError(f"steps {steps!r} must be an integer from 1 to {MAX_STEPS}", field="steps")
    return steps


def prune_iteratively(
    model: nn.Module,
    blocks: torch.Tensor,
    ratio: float,
    steps: int,
    criterion: str = "taylor",
    plan_settings: PlanSettings | None = None,
    reconstruction: ReconstructionSettings | None = None,
    first_scores: Scores | None = None,
    **score_options,
) -> IterativeResult:
    """Remove ``ratio`` of ``model``'s attention+MLP parameters in ``steps`` rounds, in place: each round scores
    the current model on ``blocks`` (``criterion``, ``score_options`` as ``importance.score`` takes them), plans
    its share with ``plan_settings`` (its ratio is replaced), refits with ``reconstruction`` and slices.
    ``first_scores``: scores of ``model`` as given (e.g. a stored importance folder), used by the first round
    instead of scoring again. ``steps=1`` is the one-shot recipe exactly."""
    check_steps(steps)
    check_rate_bounds(ratio, "ratio")
    plan_settings = plan_settings or PlanSettings()
    reconstruction = reconstruction or ReconstructionSettings()
    reconstruction.validate()
    original = geometry_of(model).unit_params()
    plans, ratios = [], []
    for step in range(1, steps + 1):
        current = geometry_of(model).unit_params()
        share = step_ratio(original, current, ratio, step, steps)
        logger.info("round %d of %d: removing %.1f%% of the current attention+MLP parameters", step, steps, 100 * share)
        if step == 1 and first_scores is not None:
            scores = first_scores
        else:
            scores = score(model, blocks, criterion, **score_options)
        plan = build_plan(scores, replace(plan_settings, ratio=share, criterion=scores.criterion))
        plan, _ = reconstruct(model, plan, blocks, reconstruction)
        apply_plan(model, plan)
        plans.append(plan)
        ratios.append(share)
    return IterativeResult(model, tuple(plans), tuple(ratios))
