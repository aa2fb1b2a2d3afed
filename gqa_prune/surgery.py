"""Apply a ``PruningPlan`` to a model: remove layers and sublayers, slice units, keep module attributes,
KV-cache slots and the config in sync. No I/O.

``apply_plan_as_mask`` is the reference semantics: zeroing what removed units add to the residual stream
(o_proj / down_proj columns of pruned groups and channels; the whole output projection and its bias of a
removed sublayer or layer) must give the same outputs as the physically pruned model (tests hold the two
within 1e-5).
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from .arch import Geometry, adapter_for, geometry_of
from .errors import GqaPruneError
from .modeling_gqa_prune import assign_cache_indices
from .planning import LayerPlan, PruningPlan
from .units import SKIP_NAMES, STRUCTURAL_KINDS, WIDTH_KINDS

# every field of the geometry, the family first: a same-shape plan of another family must not pass
_GEOMETRY_FIELDS = tuple(field.name for field in fields(Geometry))


def check_plan_fits(plan: PruningPlan, model: nn.Module) -> Geometry:
    """The plan must have been built for exactly this model: family, shape (depth included), biases, and
    parameter count (embeddings tied or not); otherwise the counts it records would not be the saved model's."""
    geometry = geometry_of(model)
    if geometry.num_layers != plan.geometry.num_layers:
        raise GqaPruneError(
            f"plan does not fit this model: the plan is for {plan.geometry.num_layers} layers, the model has "
            f"{geometry.num_layers}"
        )
    for name in _GEOMETRY_FIELDS:
        if getattr(geometry, name) != getattr(plan.geometry, name):
            raise GqaPruneError(
                f"plan does not fit this model: plan {name}={getattr(plan.geometry, name)}, "
                f"model {name}={getattr(geometry, name)}"
            )
    parameters = sum(parameter.numel() for parameter in model.parameters())  # tied embeddings once
    if parameters != plan.params_before:
        embedding = model.get_input_embeddings().weight.numel()
        tied = {
            parameters + embedding: " (this model ties its input and output embeddings, the plan's model did not)",
            parameters - embedding: " (the plan's model tied its embeddings, this one does not)",
        }.get(plan.params_before, "")
        raise GqaPruneError(
            f"plan does not fit this model: plan params_before={plan.params_before:,}, model has "
            f"{parameters:,} parameters{tied}"
        )
    return geometry


def mixes_attention_types(config) -> bool:
    """Whether the layers of a model differ in attention type (``layer_types``: sliding and full, or attention
    and state-space): then single attention sublayers cannot go (the KV cache is renumbered over the layers
    that keep one)."""
    return len(set(getattr(config, "layer_types", None) or ["full_attention"])) > 1


def check_attention_removable(config, instead: str = "--mode depth") -> None:
    """Refuse removing single attention sublayers of a model that mixes attention types."""
    if mixes_attention_types(config):
        raise GqaPruneError(
            "this model mixes attention types across layers (layer_types); removing single attention sublayers "
            f"is supported only when every layer has the same type (remove whole layers instead: {instead})"
        )


def _check_attention_types(config, plan: PruningPlan) -> None:
    if any(not layer.keeps("attn") and not layer.removes_layer for layer in plan.layers):
        check_attention_removable(config)


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the planned layers, sublayers and units (in place) and update the model config."""
    geometry = check_plan_fits(plan, model)
    _check_attention_types(model.config, plan)
    adapter = adapter_for(model.config)
    decoder_layers = adapter.decoder_layers(model)
    with torch.no_grad():
        for layer, layer_plan in zip(decoder_layers, plan.layers):
            if layer_plan.removes_layer:
                continue
            for kind in STRUCTURAL_KINDS:
                if kind.name in layer_plan.removed:
                    kind.remove(layer, adapter)
            for kind in WIDTH_KINDS:
                if layer_plan.keeps(kind.scopes[0]):
                    kind.slice(layer, adapter, geometry, layer_plan.layer, layer_plan.kept[kind.name])
            if layer_plan.removed:  # a layer short of a sublayer runs with the decoder layer that skips it
                layer.__class__ = adapter.pruned_decoder_layer_class
    kept = [layer for layer, layer_plan in zip(decoder_layers, plan.layers) if not layer_plan.removes_layer]
    if len(kept) != len(decoder_layers):
        parent_path, _, attribute = adapter.layers_path.rpartition(".")
        setattr(model.get_submodule(parent_path), attribute, nn.ModuleList(kept))
    assign_cache_indices(kept)
    set_config_shapes(model.config, plan.pruned_geometry(), plan.kept_layers)
    return model


def cut_layer_lists(config, kept_layers: tuple[int, ...]) -> None:
    """The config of a model that keeps only ``kept_layers`` (original indices): the layer count and the lists
    indexed by layer (``layer_types``) cut to them; ``per_layer_config`` dropped (indices change: the caller
    rebuilds it)."""
    if len(kept_layers) == config.num_hidden_layers:
        return
    config.per_layer_config = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in kept_layers]
    config.num_hidden_layers = len(kept_layers)
    if hasattr(config, "max_window_layers"):  # Qwen2: layer_types already says which layers slide
        config.max_window_layers = min(config.max_window_layers, config.num_hidden_layers)


def set_config_shapes(config, geometry: Geometry, kept_layers: tuple[int, ...] | None = None) -> None:
    """Describe the pruned shape in the config: global sizes when all layers agree and are whole, else
    ``per_layer_config`` (sizes, and ``skip`` for removed sublayers). ``kept_layers`` are the original
    indices of the layers that remain (per-layer lists such as ``layer_types`` are cut to them)."""
    config.head_dim = geometry.head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    if kept_layers is not None:
        cut_layer_lists(config, kept_layers)
    whole = all(geometry.has_attention(i) and geometry.has_mlp(i) for i in range(geometry.num_layers))
    shapes = set(zip(geometry.kv_groups, geometry.intermediate_sizes))
    gqa, mlp = WIDTH_KINDS[0], WIDTH_KINDS[1]
    if whole and len(shapes) == 1:
        ((kv_groups, intermediate_size),) = shapes
        config.per_layer_config = None
        for key, value in {
            **gqa.config_entries(geometry, kv_groups),
            **mlp.config_entries(geometry, intermediate_size),
        }.items():
            setattr(config, key, value)
        return
    # global values stay those of the dense model; every layer lists its own
    config.allow_global_per_layer_attribute_access = True
    entries = {}
    for index in range(geometry.num_layers):
        entry, skip = {}, []
        for kind in (gqa, mlp):
            units = kind.count(geometry, index)
            if units:
                entry.update(kind.config_entries(geometry, units))
            else:
                skip.append(SKIP_NAMES[kind.scopes[0]])
        if skip:
            entry["skip"] = skip
        entries[index] = entry
    config.per_layer_config = entries


def apply_plan_as_mask(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Reference: zero what every removed unit, sublayer and layer adds to the residual stream (in place)."""
    geometry = check_plan_fits(plan, model)
    adapter = adapter_for(model.config)
    for layer, layer_plan in zip(adapter.decoder_layers(model), plan.layers):
        mask_layer(layer, layer_plan, adapter, geometry)
    return model


@torch.no_grad()
def mask_layer(layer: nn.Module, layer_plan: LayerPlan, adapter, geometry) -> None:
    """Zero what one layer's removed units, sublayers or the layer itself add to the residual stream."""
    for kind in STRUCTURAL_KINDS:
        if kind.name in layer_plan.removed:
            kind.mask(layer, adapter)
    for kind in WIDTH_KINDS:
        if layer_plan.keeps(kind.scopes[0]):
            kind.mask(layer, adapter, geometry, layer_plan.kept[kind.name])
