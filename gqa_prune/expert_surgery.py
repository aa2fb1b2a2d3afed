"""Apply an ``ExpertPlan`` to a mixture-of-experts model: slice routers and fused experts (and the channels of
the kept experts), keep the cached expert counts and widths and the config in sync. No I/O.

``masked_experts`` is the reference semantics: the dense model with the removed experts given router logits
of -inf (no token reaches them; the softmax runs over the kept ones) and the removed channels' down_proj
columns zeroed must give the same outputs as the physically pruned model (tests hold the two within 1e-5,
in every supported family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import GqaPruneError
from .expert_plan import ExpertPlan
from .moe import ExpertGeometry, MoeFamily, expert_geometry_of, moe_family_for
from .units.expert import EXPERT
from .units.expert_channel import EXPERT_CHANNEL

_GEOMETRY_FIELDS = ("family", "top_k", "experts", "widths", "params_per_channel", "expert_fixed_params")


def check_expert_plan_fits(plan: ExpertPlan, model: nn.Module) -> None:
    """The plan must have been built for exactly this model: family, experts and widths per layer, top-k,
    parameters per expert and channel, and the parameter count."""
    geometry = expert_geometry_of(model)
    for name in _GEOMETRY_FIELDS:
        planned, actual = getattr(plan.geometry, name), getattr(geometry, name)
        if planned != actual:
            raise GqaPruneError(f"plan does not fit this model: plan {name}={planned}, model {name}={actual}")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters != plan.params_before:
        raise GqaPruneError(
            f"plan does not fit this model: plan params_before={plan.params_before:,}, model has {parameters:,}"
        )


def _blocks(model: nn.Module, family: MoeFamily, plan: ExpertPlan):
    """(layer index, sparse block, kept experts) of every MoE layer."""
    for index, (layer, kept) in enumerate(zip(family.decoder_layers(model), plan.kept)):
        if kept:
            yield index, family.sparse_block(layer), kept


def apply_expert_plan(model: nn.Module, plan: ExpertPlan) -> nn.Module:
    """Physically keep only the planned experts and channels of every MoE layer (in place); the config says
    the new counts (global values when every MoE layer agrees, else ``per_layer_config``)."""
    check_expert_plan_fits(plan, model)
    family = moe_family_for(model.config)
    with torch.no_grad():
        for index, block, kept in _blocks(model, family, plan):
            EXPERT.slice(block, family, kept)
            if plan.channels is not None:
                EXPERT_CHANNEL.slice(block, family, plan.channels[index])
    set_expert_config(model.config, family, plan.pruned_geometry())
    return model


def set_expert_config(config, family: MoeFamily, geometry: ExpertGeometry) -> None:
    """Record expert counts and widths: one value each when every MoE layer agrees (a stock config), else per
    layer in ``per_layer_config`` (the project's model class builds each layer from its entry)."""
    moe = geometry.moe_layers
    counts, widths = {geometry.experts[i] for i in moe}, {geometry.widths[i] for i in moe}
    if len(counts) == 1 and len(widths) == 1:
        setattr(config, family.experts_key, counts.pop())
        setattr(config, family.width_key, widths.pop())
        return
    config.allow_global_per_layer_attribute_access = True
    config.per_layer_config = {
        index: {family.experts_key: geometry.experts[index], family.width_key: geometry.widths[index]}
        if index in moe
        else {}
        for index in range(geometry.num_layers)
    }


@contextlib.contextmanager
def masked_experts(model: nn.Module, plan: ExpertPlan) -> Iterator[nn.Module]:
    """Reference: within the block, no token of ``model`` is routed to an expert the plan removes, and the
    channels it removes add nothing (their down_proj columns are zeroed, and restored on exit)."""
    check_expert_plan_fits(plan, model)
    family = moe_family_for(model.config)
    handles, saved = [], []
    for index, block, kept in _blocks(model, family, plan):
        handles.append(EXPERT.mask(block, family, model.config, kept))
        if plan.channels is not None:
            saved.append((block.experts.down_proj, block.experts.down_proj.detach().clone()))
            # channel lists name kept experts in order; removed experts are never routed to, keep them whole
            per_expert = [tuple(range(plan.geometry.widths[index]))] * plan.geometry.experts[index]
            for expert, channels in zip(kept, plan.channels[index]):
                per_expert[expert] = channels
            with torch.no_grad():
                EXPERT_CHANNEL.mask(block, family, per_expert)
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for parameter, original in saved:
                parameter.copy_(original)
