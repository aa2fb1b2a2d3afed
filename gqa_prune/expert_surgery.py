"""Apply an ``ExpertPlan`` to a mixture-of-experts model: slice routers and fused experts (and the channels of
the kept experts) and the GQA groups of its attention layers; keep the cached counts and the config in sync.
No I/O.

``masked_experts`` is the reference semantics: the dense model with the removed experts given router logits
of -inf (no token reaches them; the softmax runs over the kept ones), the removed channels' down_proj
columns and the removed groups' o_proj columns zeroed must give the same outputs as the physically pruned
model (tests hold the two within 1e-5, in every supported family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .arch import FamilyAdapter, Geometry
from .errors import GqaPruneError
from .expert_plan import ExpertPlan
from .modeling_gqa_prune import PRUNED_DECODER_LAYERS, assign_cache_indices, skip_sublayer
from .moe import (
    MOE_FAMILIES,
    ExpertGeometry,
    MoeFamily,
    attention_block,
    expert_geometry_of,
    moe_family_for,
    sublayer_parts,
)
from .surgery import check_attention_removable, cut_layer_lists
from .units.expert import EXPERT
from .units.expert_channel import EXPERT_CHANNEL
from .units.gqa_group import GQA_GROUP
from .units.shared_channel import SHARED_CHANNEL

_GEOMETRY_FIELDS = ("family", "top_k", "experts", "widths", "params_per_channel", "expert_fixed_params")
_GROUP_FIELDS = ("kv_groups", "heads_per_group", "head_dim", "params_per_group")  # checked where the plan has them
_SHARED_FIELDS = ("shared_widths", "params_per_shared_channel")  # likewise


def check_expert_plan_fits(plan: ExpertPlan, model: nn.Module) -> None:
    """The plan must have been built for exactly this model: family, experts and widths per layer, top-k,
    parameters per expert and channel, and the parameter count."""
    geometry = expert_geometry_of(model)
    recorded = (
        (_GROUP_FIELDS if plan.geometry.kv_groups else ())
        + (_SHARED_FIELDS if plan.geometry.shared_widths else ())
        + (("layer_params",) if plan.geometry.layer_params else ())
        + (("sublayer_params",) if plan.geometry.sublayer_params else ())
    )
    for name in _GEOMETRY_FIELDS + recorded:
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


def attention_view(model: nn.Module, plan: ExpertPlan) -> tuple[FamilyAdapter, Geometry]:
    """The dense machinery's view of the attention layers, so GQA groups are sliced and masked by the same
    ``gqa_group`` unit kind as in a dense model (a Geometry with no MLP channels: experts are not its units)."""
    geometry = plan.geometry
    family = MOE_FAMILIES[geometry.family]
    first = attention_block(family.decoder_layers(model)[geometry.attention_layers[0]])
    attention = Geometry(
        family=geometry.family,
        hidden_size=int(model.config.hidden_size),
        head_dim=geometry.head_dim,
        heads_per_group=geometry.heads_per_group,
        kv_groups=geometry.kv_groups,
        intermediate_sizes=(0,) * geometry.num_layers,
        qkv_bias=first.q_proj.bias is not None,
        o_bias=first.o_proj.bias is not None,
        mlp_bias=False,
    )
    return FamilyAdapter(geometry.family, family.model_class), attention


def _width_layers(model: nn.Module, plan: ExpertPlan, kept_per_layer):
    """(layer index, decoder layer, kept units) of every layer where a dense width kind of the plan applies."""
    layers = MOE_FAMILIES[plan.geometry.family].decoder_layers(model)
    for index, kept in enumerate(kept_per_layer or ()):
        if kept:
            yield index, layers[index], kept


def _slice_sinks(attention: nn.Module, kept: tuple[int, ...], heads_per_group: int) -> None:
    """gpt-oss: one learned attention sink per query head; keep those of the kept groups' heads."""
    sinks = getattr(attention, "sinks", None)
    if isinstance(sinks, nn.Parameter):
        heads = torch.as_tensor([group * heads_per_group + head for group in kept for head in range(heads_per_group)])
        attention.sinks = nn.Parameter(sinks.detach()[heads].contiguous(), requires_grad=sinks.requires_grad)


def apply_expert_plan(model: nn.Module, plan: ExpertPlan) -> nn.Module:
    """Physically keep only the planned experts and channels of every MoE layer, the planned GQA groups of
    every attention layer and the planned channels of every shared MLP, and remove the planned sublayers and
    layers (in place); the config says the new counts (global values when every MoE layer agrees, else
    ``per_layer_config``, which also lists removed sublayers as ``skip``)."""
    check_expert_plan_fits(plan, model)
    family = moe_family_for(model.config)
    _check_sublayers_removable(model.config, plan)
    with torch.no_grad():
        for index, block, kept in _blocks(model, family, plan):
            EXPERT.slice(block, family, kept)
            if plan.channels is not None:
                EXPERT_CHANNEL.slice(block, family, plan.channels[index])
        if plan.groups is not None:
            adapter, attention = attention_view(model, plan)
            for index, layer, kept in _width_layers(model, plan, plan.groups):
                GQA_GROUP.slice(layer, adapter, attention, index, kept)
                _slice_sinks(attention_block(layer), kept, attention.heads_per_group)
        for _, layer, kept in _width_layers(model, plan, plan.shared_channels):
            SHARED_CHANNEL.slice(layer, family, kept)
    layers = family.decoder_layers(model)
    for index, name in plan.removed_sublayers:  # the class first: it knows which attributes make the sublayer
        layers[index].__class__ = PRUNED_DECODER_LAYERS[family.family]
        skip_sublayer(layers[index], name)
    if plan.removed_layers:
        _remove_layers(model, family, plan.removed_layers)
    if any(name == "attention" for _, name in plan.removed_sublayers):
        assign_cache_indices(layers)
    set_expert_config(model.config, family, plan.pruned_geometry(), _skips(plan))
    return model


def _check_sublayers_removable(config, plan: ExpertPlan) -> None:
    if any(name == "attention" for _, name in plan.removed_sublayers):
        check_attention_removable(config, instead="--whole-layers removes them whole")


def _skips(plan: ExpertPlan) -> dict[int, list[str]]:
    """Removed sublayers by their layer's index in the pruned model (removed layers no longer counted)."""
    kept = [layer for layer in range(plan.geometry.num_layers) if layer not in plan.removed_layers]
    skips: dict[int, list[str]] = {}
    for layer, name in plan.removed_sublayers:
        skips.setdefault(kept.index(layer), []).append(name)
    return skips


def _remove_layers(model: nn.Module, family: MoeFamily, removed: tuple[int, ...]) -> None:
    """Delete whole decoder layers; renumber what the caches index by layer (attention and state-space blocks);
    cut the config's per-layer lists, and say which of the remaining layers have a dense MLP (Qwen-MoE's
    ``mlp_only_layers`` and ``decoder_sparse_step`` are positional)."""
    layers = family.decoder_layers(model)
    kept = tuple(index for index in range(len(layers)) if index not in removed)
    dense = [position for position, index in enumerate(kept) if family.sparse_block(layers[index]) is None]
    for index in sorted(removed, reverse=True):
        del layers[index]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if "layer_idx" in vars(module):
                module.layer_idx = position
    cut_layer_lists(model.config, kept)
    if hasattr(model.config, "mlp_only_layers"):
        model.config.mlp_only_layers = dense
        model.config.decoder_sparse_step = 1


def set_expert_config(
    config, family: MoeFamily, geometry: ExpertGeometry, skips: dict[int, list[str]] | None = None
) -> None:
    """Record expert counts and widths, attention heads and shared-MLP widths: one global value for each kind
    whose layers all agree (when every kind agrees and no sublayer is removed, a stock config), else that kind
    per layer in ``per_layer_config`` (the project's model class builds each layer from its entry; the global
    values of that kind stay the dense model's); ``skips``: per layer, the sublayers it lacks."""
    if geometry.attention_layers:
        config.head_dim = geometry.head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    hpg = geometry.heads_per_group
    kinds = (  # per kind: its config entries in every layer that has it
        {i: {"num_key_value_heads": geometry.kv_groups[i], "num_attention_heads": geometry.kv_groups[i] * hpg}
         for i in geometry.attention_layers},
        {i: {family.shared_mlp.width_key: width} for i, width in enumerate(geometry.shared_widths) if width},
        {i: {family.experts_key: geometry.experts[i], family.width_key: geometry.widths[i]}
         for i in geometry.moe_layers},
    )  # fmt: skip
    per_layer: dict[int, dict[str, int]] = {index: {} for index in range(geometry.num_layers)}
    for entries in kinds:
        if len({tuple(sorted(values.items())) for values in entries.values()}) <= 1:
            for key, value in next(iter(entries.values()), {}).items():
                setattr(config, key, value)
        else:
            for index, values in entries.items():
                per_layer[index].update(values)
    for index, names in (skips or {}).items():
        per_layer[index]["skip"] = list(names)
    if any(per_layer.values()):
        config.allow_global_per_layer_attribute_access = True
        config.per_layer_config = per_layer


def _bypass(layer: nn.Module, args, kwargs, output) -> torch.Tensor:
    """Forward hook: the decoder layer passes its input on unchanged (what removing it does)."""
    return args[0] if args else kwargs["hidden_states"]


def _silence(block: nn.Module, args, output):
    """Forward hook: the block adds nothing to the residual stream (what removing its sublayer does); what it
    returns beside its output (attention weights, gpt-oss's router scores) stays."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def mask_expert_layer(model: nn.Module, plan: ExpertPlan, index: int) -> tuple[list, list]:
    """Mask decoder layer ``index`` as ``masked_experts`` does (in place); returns the hook handles to remove
    and the (parameter, original) pairs whose columns were zeroed."""
    family = moe_family_for(model.config)
    layer = family.decoder_layers(model)[index]
    handles, saved = [], []
    kept = plan.kept[index]
    if kept:
        block = family.sparse_block(layer)
        handles.append(EXPERT.mask(block, family, model.config, kept))
        if plan.channels is not None:
            saved.append((block.experts.down_proj, block.experts.down_proj.detach().clone()))
            # channel lists name kept experts in order; removed experts are never routed to, keep them whole
            per_expert = [tuple(range(plan.geometry.widths[index]))] * plan.geometry.experts[index]
            for expert, channels in zip(kept, plan.channels[index]):
                per_expert[expert] = channels
            with torch.no_grad():
                EXPERT_CHANNEL.mask(block, family, per_expert)
    if plan.groups is not None and plan.groups[index]:
        adapter, attention = attention_view(model, plan)
        o_proj = attention_block(layer).o_proj.weight
        saved.append((o_proj, o_proj.detach().clone()))
        with torch.no_grad():
            GQA_GROUP.mask(layer, adapter, attention, plan.groups[index])
    if plan.shared_channels is not None and plan.shared_channels[index]:
        output = family.shared_mlp.output(family.shared_mlp.module(layer)).weight
        saved.append((output, output.detach().clone()))
        with torch.no_grad():
            SHARED_CHANNEL.mask(layer, family, plan.shared_channels[index])
    if index in plan.removed_layers:
        handles.append(layer.register_forward_hook(_bypass, with_kwargs=True))
    for _, name in (removed for removed in plan.removed_sublayers if removed[0] == index):
        blocks = [getattr(layer, attribute) for attribute in sublayer_parts(family, name)[:-1]]  # the norm stays
        handles += [block.register_forward_hook(_silence) for block in blocks if block is not None]
    return handles, saved


@contextlib.contextmanager
def masked_experts(model: nn.Module, plan: ExpertPlan) -> Iterator[nn.Module]:
    """Reference: within the block, no token of ``model`` is routed to an expert the plan removes, the
    channels, GQA groups and shared-MLP channels it removes add nothing (their output projections' columns
    are zeroed, and restored on exit), every sublayer it removes adds nothing (its blocks' outputs are zero)
    and every layer it removes passes its input on unchanged."""
    check_expert_plan_fits(plan, model)
    handles, saved = [], []
    for index in range(plan.geometry.num_layers):
        layer_handles, layer_saved = mask_expert_layer(model, plan, index)
        handles += layer_handles
        saved += layer_saved
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for parameter, original in saved:
                parameter.copy_(original)
