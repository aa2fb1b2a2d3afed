"""What a supported model family looks like: where layers, sublayers and projections live; its GQA geometry.

Everything else asks this module for module paths, query heads per KV head and head_dim; nothing else
hard-codes them. Which weights a prunable *unit* owns is the business of its kind (``gqa_prune.units``):
a GQA group owns q rows, o columns and its KV head's k and v rows; an MLP channel a gate/up row and a down
column; a sublayer its whole attention or MLP block with the norm in front of it; a layer both sublayers.
A pruned model may have layers without attention or without MLP: their block attribute is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .errors import GqaPruneError
from .modeling_gqa_prune import PRUNED_CLASSES, PRUNED_DECODER_LAYERS
from .moe import MOE_FAMILIES, moe_family_for

Scope = Literal["attn", "mlp"]  # the sublayer a projection belongs to


@dataclass(frozen=True)
class ProjectionRole:
    """How one projection's weight maps onto prunable units.

    ``axis`` is the weight axis that indexes units ("out" = rows, "in" = columns); ``rows_per_unit`` is
    how many consecutive indices on that axis one unit owns, in units of head_dim for attention
    (``per_query_head`` marks q/o, which own ``heads_per_group * head_dim`` indices per group).
    """

    module: str  # attribute of the attention or MLP block
    unit: Scope
    axis: Literal["out", "in"]
    per_query_head: bool = False


ATTENTION_ROLES = (
    ProjectionRole("q_proj", "attn", "out", per_query_head=True),
    ProjectionRole("k_proj", "attn", "out"),
    ProjectionRole("v_proj", "attn", "out"),
    ProjectionRole("o_proj", "attn", "in", per_query_head=True),
)
MLP_ROLES = (
    ProjectionRole("gate_proj", "mlp", "out"),
    ProjectionRole("up_proj", "mlp", "out"),
    ProjectionRole("down_proj", "mlp", "in"),
)
ALL_ROLES = ATTENTION_ROLES + MLP_ROLES


@dataclass(frozen=True)
class FamilyAdapter:
    """One supported family: its stock and pruned classes, and where its blocks live."""

    family: str
    model_class: type[PreTrainedModel]  # stock causal-LM class (its config_class is the stock config)
    layers_path: str = "model.layers"
    attention_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    attention_norm_attr: str = "input_layernorm"  # the norm in front of the attention block
    mlp_norm_attr: str = "post_attention_layernorm"  # the norm in front of the MLP block

    @property
    def pruned_config_class(self) -> type:
        return PRUNED_CLASSES[self.family][0]

    @property
    def pruned_model_class(self) -> type[PreTrainedModel]:
        return PRUNED_CLASSES[self.family][1]

    @property
    def pruned_decoder_layer_class(self) -> type[nn.Module]:
        """The family's decoder layer that runs with a sublayer removed (from the shipped modeling file)."""
        return PRUNED_DECODER_LAYERS[self.family]

    @property
    def model_types(self) -> tuple[str, str]:
        return (self.model_class.config_class.model_type, self.pruned_config_class.model_type)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def block_attr(self, scope: Scope) -> str:
        return self.attention_attr if scope == "attn" else self.mlp_attr

    def norm_attr(self, scope: Scope) -> str:
        return self.attention_norm_attr if scope == "attn" else self.mlp_norm_attr

    def sublayer(self, layer: nn.Module, scope: Scope) -> nn.Module | None:
        """The attention or MLP block of a decoder layer; None where a plan removed it."""
        return getattr(layer, self.block_attr(scope))

    def block(self, layer: nn.Module, role: ProjectionRole) -> nn.Module:
        return self.sublayer(layer, role.unit)

    def projection(self, layer: nn.Module, role: ProjectionRole) -> nn.Linear:
        return getattr(self.block(layer, role), role.module)

    def projections(self, layer: nn.Module, roles=None):
        """(role, Linear) of every projection a layer still has (none of a removed sublayer)."""
        for role in ALL_ROLES if roles is None else roles:
            if self.block(layer, role) is not None:
                yield role, self.projection(layer, role)


ADAPTERS = {
    adapter.family: adapter
    for adapter in (
        FamilyAdapter("llama", LlamaForCausalLM),
        FamilyAdapter("mistral", MistralForCausalLM),
        FamilyAdapter("qwen2", Qwen2ForCausalLM),
        FamilyAdapter("qwen3", Qwen3ForCausalLM),
    )
}
SUPPORTED_FAMILIES = tuple(ADAPTERS)


def adapter_for(config) -> FamilyAdapter:
    """The adapter for a transformers config, or a one-line refusal naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    if model_type in MOE_FAMILIES:
        raise GqaPruneError(
            f"{model_type!r} is a mixture of experts: gqa-prune prunes its experts (importance, then plan "
            f"--expert-ratio); GQA groups, channels and layers only of {', '.join(SUPPORTED_FAMILIES)}"
        )
    raise GqaPruneError(
        f"unsupported architecture {model_type!r}: gqa-prune supports {', '.join(SUPPORTED_FAMILIES)} "
        f"(decoder-only GQA models with q/k/v/o and gate/up/down projections) and the experts of "
        f"{', '.join(MOE_FAMILIES)}"
    )


@dataclass(frozen=True)
class Geometry:
    """Per-layer shapes of a (possibly pruned) model, enough to index units and count parameters.

    A layer whose attention (MLP) sublayer was removed has 0 KV groups (0 MLP channels); removed layers are
    not listed. ``attn_fixed_params`` / ``mlp_fixed_params`` are the parameters of a sublayer that belong to
    no unit (its norm, o_proj / down_proj bias, Qwen3's q/k norms): they go only with the whole sublayer.
    """

    family: str
    hidden_size: int
    head_dim: int
    heads_per_group: int  # query heads per KV head: 1 = MHA, 3 = SmolLM2, 4 = Llama-3
    kv_groups: tuple[int, ...]  # per layer; 0 = no attention
    intermediate_sizes: tuple[int, ...]  # per layer; 0 = no MLP
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    attn_fixed_params: int = 0
    mlp_fixed_params: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.kv_groups)

    def indices_per_unit(self, role: ProjectionRole) -> int:
        """How many consecutive rows/columns of a projection one unit owns."""
        if role.unit == "mlp":
            return 1
        return self.head_dim * (self.heads_per_group if role.per_query_head else 1)

    @property
    def params_per_group(self) -> int:
        """Parameters removed with one GQA group (q, k, v rows incl. biases, o columns)."""
        q_and_o = 2 * self.heads_per_group * self.head_dim * self.hidden_size
        k_and_v = 2 * self.head_dim * self.hidden_size
        bias = (self.heads_per_group + 2) * self.head_dim if self.qkv_bias else 0
        return q_and_o + k_and_v + bias

    @property
    def params_per_channel(self) -> int:
        """Parameters removed with one MLP channel (gate and up rows incl. biases, down column)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def attention_params(self, layer: int) -> int:
        """Parameters of a layer's attention owned by its GQA groups (what ratios are measured against)."""
        return self.kv_groups[layer] * self.params_per_group

    def mlp_params(self, layer: int) -> int:
        return self.intermediate_sizes[layer] * self.params_per_channel

    def unit_params(self) -> int:
        """Attention+MLP parameters owned by units in every layer: what plan ratios are fractions of."""
        return sum(self.attention_params(i) + self.mlp_params(i) for i in range(self.num_layers))

    def has_attention(self, layer: int) -> bool:
        return self.kv_groups[layer] > 0

    def has_mlp(self, layer: int) -> bool:
        return self.intermediate_sizes[layer] > 0

    def sublayer_params(self, layer: int, scope: Scope) -> int:
        """Every parameter of a layer's attention or MLP sublayer, its norm included (0 if removed)."""
        if scope == "attn":
            return self.attention_params(layer) + (self.attn_fixed_params if self.has_attention(layer) else 0)
        return self.mlp_params(layer) + (self.mlp_fixed_params if self.has_mlp(layer) else 0)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "heads_per_group": self.heads_per_group,
            "kv_groups": list(self.kv_groups),
            "intermediate_sizes": list(self.intermediate_sizes),
            "qkv_bias": self.qkv_bias,
            "o_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "attn_fixed_params": self.attn_fixed_params,
            "mlp_fixed_params": self.mlp_fixed_params,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        """Read a geometry; one written before sublayers could be removed gets its fixed parameters derived."""
        hidden, family = data["hidden_size"], data["family"]
        return cls(
            family=family,
            hidden_size=hidden,
            head_dim=data["head_dim"],
            heads_per_group=data["heads_per_group"],
            kv_groups=tuple(data["kv_groups"]),
            intermediate_sizes=tuple(data["intermediate_sizes"]),
            qkv_bias=data["qkv_bias"],
            o_bias=data["o_bias"],
            mlp_bias=data["mlp_bias"],
            attn_fixed_params=data.get(
                "attn_fixed_params",
                hidden * (1 + data["o_bias"]) + (2 * data["head_dim"] if family == "qwen3" else 0),
            ),
            mlp_fixed_params=data.get("mlp_fixed_params", hidden * (1 + data["mlp_bias"])),
        )


def _parameter_count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(parameter.numel() for parameter in module.parameters())


def geometry_of(model: nn.Module) -> Geometry:
    """Read the geometry from the modules themselves (the truth after surgery), checked against GQA rules."""
    config = model.config
    adapter = adapter_for(config)
    layers = adapter.decoder_layers(model)
    with_attention = [layer for layer in layers if adapter.sublayer(layer, "attn") is not None]
    with_mlp = [layer for layer in layers if adapter.sublayer(layer, "mlp") is not None]
    if not with_attention or not with_mlp:
        raise GqaPruneError("the model has no layer with attention, or none with an MLP; gqa-prune cannot read it")
    first_attention = adapter.sublayer(with_attention[0], "attn")
    head_dim = int(first_attention.head_dim)
    heads_per_group = int(first_attention.num_key_value_groups)

    kv_groups, intermediate_sizes = [], []
    for layer_index, layer in enumerate(layers):
        if adapter.sublayer(layer, "attn") is None:
            kv_groups.append(0)
        else:
            q_rows = adapter.projection(layer, ATTENTION_ROLES[0]).out_features
            k_rows = adapter.projection(layer, ATTENTION_ROLES[1]).out_features
            if k_rows % head_dim or q_rows != k_rows * heads_per_group:
                raise GqaPruneError(
                    f"layer {layer_index}: q_proj has {q_rows} rows and k_proj {k_rows}; expected "
                    f"{heads_per_group} query heads of {head_dim} per KV head"
                )
            kv_groups.append(k_rows // head_dim)
        has_mlp = adapter.sublayer(layer, "mlp") is not None
        intermediate_sizes.append(adapter.projection(layer, MLP_ROLES[0]).out_features if has_mlp else 0)

    geometry = Geometry(
        family=adapter.family,
        hidden_size=int(config.hidden_size),
        head_dim=head_dim,
        heads_per_group=heads_per_group,
        kv_groups=tuple(kv_groups),
        intermediate_sizes=tuple(intermediate_sizes),
        qkv_bias=adapter.projection(with_attention[0], ATTENTION_ROLES[0]).bias is not None,
        o_bias=adapter.projection(with_attention[0], ATTENTION_ROLES[3]).bias is not None,
        mlp_bias=adapter.projection(with_mlp[0], MLP_ROLES[0]).bias is not None,
    )
    index_a = next(i for i, layer in enumerate(layers) if layer is with_attention[0])
    index_m = next(i for i, layer in enumerate(layers) if layer is with_mlp[0])
    attention_total = _parameter_count(first_attention) + _parameter_count(
        getattr(with_attention[0], adapter.norm_attr("attn"))
    )
    mlp_total = _parameter_count(adapter.sublayer(with_mlp[0], "mlp")) + _parameter_count(
        getattr(with_mlp[0], adapter.norm_attr("mlp"))
    )
    return replace(
        geometry,
        attn_fixed_params=attention_total - geometry.attention_params(index_a),
        mlp_fixed_params=mlp_total - geometry.mlp_params(index_m),
    )


def check_config_supported(config) -> FamilyAdapter | None:
    """Refuse unsupported families and head layouts before any weights are touched (None: a supported
    mixture-of-experts family, whose experts ``gqa_prune.moe`` handles)."""
    if moe_family_for(config) is not None:
        return None
    adapter = adapter_for(config)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % kv_heads != 0:
        raise GqaPruneError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}: "
            "GQA groups need a whole number of query heads per KV head"
        )
    return adapter
