"""Apply a ``PruningPlan`` to a model: slice weights, keep Linear attributes and the config in sync. No I/O.

``apply_plan_as_mask`` is the reference semantics: zeroing the o_proj columns of pruned groups and the
down_proj columns of pruned channels removes exactly their contribution, so the physically pruned model
must give the same outputs (tests hold the two within 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ALL_ROLES, Geometry, ProjectionRole, adapter_for, geometry_of
from .errors import GqaPruneError
from .plan import LayerPlan, PruningPlan

_SHAPE_FIELDS = ("head_dim", "heads_per_group", "kv_groups", "intermediate_sizes", "hidden_size")


def kept_indices(role: ProjectionRole, geometry: Geometry, layer_plan: LayerPlan) -> torch.Tensor:
    """Rows (axis "out") or columns (axis "in") of a projection that the plan keeps, ascending."""
    kept_units = layer_plan.kept_kv_groups if role.unit == "attn" else layer_plan.kept_mlp_channels
    width = geometry.indices_per_unit(role)
    units = torch.tensor(kept_units, dtype=torch.long)
    return (units.unsqueeze(1) * width + torch.arange(width)).flatten()


def _slice_linear(linear: nn.Linear, axis: str, indices: torch.Tensor) -> None:
    """Keep only ``indices`` along ``axis`` of a Linear, updating its in/out_features to match."""
    indices = indices.to(linear.weight.device)
    dim = 0 if axis == "out" else 1
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(
        linear.weight.detach().index_select(dim, indices).contiguous(), requires_grad=requires_grad
    )
    if axis == "out":
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.detach().index_select(0, indices).contiguous(), requires_grad=requires_grad
            )
        linear.out_features = len(indices)
    else:
        linear.in_features = len(indices)


def check_plan_fits(plan: PruningPlan, model: nn.Module) -> Geometry:
    """The plan must have been built for a model of exactly this shape."""
    geometry = geometry_of(model)
    for name in _SHAPE_FIELDS:
        if getattr(geometry, name) != getattr(plan.geometry, name):
            raise GqaPruneError(
                f"plan does not fit this model: plan {name}={getattr(plan.geometry, name)}, "
                f"model {name}={getattr(geometry, name)}"
            )
    return geometry


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the planned groups and channels (in place) and update the model config."""
    geometry = check_plan_fits(plan, model)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer, layer_plan in zip(adapter.decoder_layers(model), plan.layers):
            for role in ALL_ROLES:
                indices = kept_indices(role, geometry, layer_plan)
                full = (geometry.kv_groups if role.unit == "attn" else geometry.intermediate_sizes)[layer_plan.layer]
                if len(indices) != full * geometry.indices_per_unit(role):
                    _slice_linear(adapter.projection(layer, role), role.axis, indices)
            _sync_attention_attributes(getattr(layer, adapter.attention_attr), len(layer_plan.kept_kv_groups), geometry)
            _sync_mlp_attributes(getattr(layer, adapter.mlp_attr), len(layer_plan.kept_mlp_channels))
    set_config_shapes(model.config, plan.pruned_geometry())
    return model


def _sync_attention_attributes(attention: nn.Module, kv_groups: int, geometry: Geometry) -> None:
    """Some transformers versions cache head counts on the module; keep whichever exist truthful."""
    for name, value in (
        ("num_heads", kv_groups * geometry.heads_per_group),
        ("num_attention_heads", kv_groups * geometry.heads_per_group),
        ("num_key_value_heads", kv_groups),
    ):
        if hasattr(attention, name):
            setattr(attention, name, value)
    if getattr(attention, "num_key_value_groups", geometry.heads_per_group) != geometry.heads_per_group:
        raise GqaPruneError("query heads per KV head changed during surgery; this is a bug in gqa-prune")


def _sync_mlp_attributes(mlp: nn.Module, channels: int) -> None:
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels


def set_config_shapes(config, geometry: Geometry) -> None:
    """Describe per-layer shapes in the config: global sizes when all layers agree, else ``per_layer_config``."""
    config.head_dim = geometry.head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    shapes = set(zip(geometry.kv_groups, geometry.intermediate_sizes))
    if len(shapes) == 1:
        ((kv_groups, intermediate_size),) = shapes
        config.per_layer_config = None
        config.num_attention_heads = kv_groups * geometry.heads_per_group
        config.num_key_value_heads = kv_groups
        config.intermediate_size = intermediate_size
        return
    # global values stay those of the dense model; layers that differ are listed
    config.allow_global_per_layer_attribute_access = True
    config.per_layer_config = {
        index: {
            "num_attention_heads": kv * geometry.heads_per_group,
            "num_key_value_heads": kv,
            "intermediate_size": channels,
        }
        for index, (kv, channels) in enumerate(zip(geometry.kv_groups, geometry.intermediate_sizes))
    }


def apply_plan_as_mask(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Reference: zero the o_proj columns of pruned groups and down_proj columns of pruned channels (in place)."""
    geometry = check_plan_fits(plan, model)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for layer, layer_plan in zip(adapter.decoder_layers(model), plan.layers):
            for role in ALL_ROLES:
                if role.axis != "in":
                    continue
                weight = adapter.projection(layer, role).weight
                keep = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
                keep[kept_indices(role, geometry, layer_plan).to(weight.device)] = True
                weight[:, ~keep] = 0
    return model
