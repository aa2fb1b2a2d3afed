"""The Python API: the pipeline on in-memory models and tensors, for notebooks and scripts.

``score`` -> ``plan`` -> ``prune`` -> ``recover`` -> ``evaluate``, each one call on a transformers model (dense or
mixture of experts) and ``[blocks, seq_len]`` token-id tensors; the CLI and the workflow run the same functions
on folders. Exported from the package (``gqa_prune.score`` ...) lazily, so ``import gqa_prune`` stays cheap::

    scores = gqa_prune.score(model, calib_blocks)
    plan = gqa_prune.plan(scores, ratio=0.2)
    model = gqa_prune.prune(model, plan, calib=calib_blocks)
    model = gqa_prune.recover(model, train_blocks, steps=50)
    perplexity = gqa_prune.evaluate(model, eval_ids).perplexity
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import GqaPruneError
from .expert_plan import ExpertPlan, build_expert_plan
from .expert_scores import ExpertScores
from .moe import moe_family_for
from .perplexity import PerplexityResult, default_window, perplexity
from .planning import PruningPlan, build_plan
from .scores import Scores
from .settings import IMPORTANCE_BATCH_SIZE, ExpertPlanSettings, PlanSettings, ReconstructionSettings, RecoverySettings

__all__ = ["score", "plan", "prune", "recover", "evaluate"]


def score(
    model: nn.Module,
    calib_blocks: torch.Tensor,
    criterion: str | None = None,
    *,
    curves: bool = True,
    batch_size: int = IMPORTANCE_BATCH_SIZE,
    **options,
) -> Scores | ExpertScores:
    """Importance of every prunable unit of ``model`` on calibration token ids ``[blocks, seq_len]``.

    Dense models: ``criterion`` scores GQA groups and MLP channels (taylor by default, fisher, obs, magnitude,
    activation, random), layers and sublayers are scored too, and ``curves`` measures each kind's loss curve
    (what the default hybrid plans price kinds by). ``options``: those of ``gqa-prune importance``
    (``layer_criteria``, ``seed``, ``curve_blocks``, ``channel_multiple``, ``gradient_checkpointing``). A mixture
    of experts gets its expert statistics (every expert criterion is chosen at ``plan`` time; ``criterion``
    taylor or fisher adds a backward per batch for those two) and per-layer loss curves of its experts, GQA
    groups and shared-MLP channels.
    """
    if moe_family_for(model.config) is not None:
        from .expert_importance import needs_gradients, score_experts

        gradients = needs_gradients(criterion)
        return score_experts(model, calib_blocks, batch_size, curves, options.pop("curve_blocks", None), gradients)
    from .choices import DEFAULT_UNIT_CRITERION
    from .importance import score as score_units

    return score_units(
        model, calib_blocks, criterion or DEFAULT_UNIT_CRITERION, batch_size=batch_size, curves=curves, **options
    )


def plan(scores: Scores | ExpertScores, ratio: float | None = 0.2, **settings) -> PruningPlan | ExpertPlan:
    """Which units to remove: ``ratio`` of the attention+MLP parameters of a dense model (default mode
    ``hybrid``; ``settings``: the fields of ``PlanSettings``, e.g. ``mode="width"``, ``protected_layers=(0,)``).

    On expert scores: ``expert_ratio`` of every MoE layer's experts and ``ratio`` of its GQA groups and
    shared-MLP channels (``settings``: the fields of ``ExpertPlanSettings``, e.g. ``criterion="frequency"``,
    ``allocation="per-layer"``)."""
    if isinstance(scores, ExpertScores):
        expert_ratio = settings.pop("expert_ratio", 0.0)
        return build_expert_plan(scores, ExpertPlanSettings(expert_ratio, width_ratio=ratio or 0.0, **settings))
    return build_plan(scores, PlanSettings(ratio=ratio, criterion=scores.criterion, **settings))


def prune(
    model: nn.Module, plan: PruningPlan | ExpertPlan, *, calib: torch.Tensor | None = None, **reconstruction
) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it. With ``calib`` blocks a dense plan is refit first
    (least squares on the pruned model's activations; ``reconstruction``: the fields of
    ``ReconstructionSettings``, e.g. ``select="plan"``, ``ridge=0.3``); ``calib=None`` slices only."""
    if isinstance(plan, ExpertPlan):
        from .expert_surgery import apply_expert_plan

        if calib is not None:
            raise GqaPruneError("prune: an expert plan removes whole experts and refits nothing; leave calib out")
        return apply_expert_plan(model, plan)
    from .surgery import apply_plan

    if calib is not None:
        from .reconstruct import reconstruct

        settings = ReconstructionSettings(**reconstruction)
        settings.validate()
        plan, _ = reconstruct(model, plan, calib, settings)
    return apply_plan(model, plan)


def recover(model: nn.Module, train_blocks: torch.Tensor, **settings) -> nn.Module:
    """LoRA recovery: train adapters on ``train_blocks`` (next-token loss) and merge them into the weights;
    returns the merged model (``settings``: the fields of ``RecoverySettings``, e.g. ``steps``, ``lr``,
    ``rank``; the ``kd`` loss needs ``teacher=`` the dense model)."""
    from .recovery import lora_model, merge, train

    teacher = settings.pop("teacher", None)
    recovery = RecoverySettings(**settings)
    recovery.validate()
    peft_model = lora_model(model, recovery)
    train(peft_model, train_blocks, recovery, teacher=teacher)
    return merge(peft_model, recovery)


def evaluate(
    model: nn.Module, token_ids: torch.Tensor, window: int | None = None, max_tokens: int | None = None
) -> PerplexityResult:
    """Perplexity of ``model`` on 1-D ``token_ids`` (e.g. WikiText-2's test split through the model's
    tokenizer, as ``gqa-prune ppl`` reads it), in non-overlapping windows of ``window`` tokens (default: the
    model's context, at most 2048)."""
    return perplexity(model, token_ids.flatten(), window or default_window(model), "token ids", max_tokens)
