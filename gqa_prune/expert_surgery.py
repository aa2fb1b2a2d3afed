"""Apply an ``ExpertPlan`` to a mixture-of-experts model: slice routers and fused experts, keep the cached
expert counts and the config in sync. No I/O.

``masked_experts`` is the reference semantics: the dense model with the removed experts given router logits
of -inf (no token reaches them; the softmax runs over the kept ones) must give the same outputs as the
physically pruned model (tests hold the two within 1e-5, in every supported family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import GqaPruneError
from .expert_plan import ExpertPlan
from .moe import expert_geometry_of, moe_family_for
from .units.expert import EXPERT


def check_expert_plan_fits(plan: ExpertPlan, model: nn.Module) -> None:
    """The plan must have been built for exactly this model: family, experts per layer, top-k, parameters."""
    geometry = expert_geometry_of(model)
    for name in ("family", "top_k", "experts", "params_per_expert"):
        planned, actual = getattr(plan.geometry, name), getattr(geometry, name)
        if planned != actual:
            raise GqaPruneError(f"plan does not fit this model: plan {name}={planned}, model {name}={actual}")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters != plan.params_before:
        raise GqaPruneError(
            f"plan does not fit this model: plan params_before={plan.params_before:,}, model has {parameters:,}"
        )


def apply_expert_plan(model: nn.Module, plan: ExpertPlan) -> nn.Module:
    """Physically keep only the planned experts of every MoE layer (in place) and update the config."""
    check_expert_plan_fits(plan, model)
    if not plan.is_uniform:
        raise GqaPruneError("expert plans with per-layer counts are not supported yet: every MoE layer keeps one count")
    family = moe_family_for(model.config)
    with torch.no_grad():
        for layer, kept in zip(family.decoder_layers(model), plan.kept):
            if kept:
                EXPERT.slice(family.sparse_block(layer), family, kept)
    setattr(model.config, family.experts_key, next(len(kept) for kept in plan.kept if kept))
    return model


@contextlib.contextmanager
def masked_experts(model: nn.Module, plan: ExpertPlan) -> Iterator[nn.Module]:
    """Reference: within the block, no token of ``model`` is routed to an expert the plan removes."""
    check_expert_plan_fits(plan, model)
    family = moe_family_for(model.config)
    handles = [
        EXPERT.mask(family.sparse_block(layer), family, model.config, kept)
        for layer, kept in zip(family.decoder_layers(model), plan.kept)
        if kept
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
