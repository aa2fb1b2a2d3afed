"""Model classes for GQA-pruned checkpoints (written by gqa-prune).

A pruned model whose decoder layers differ in shape records the per-layer sizes with transformers'
``per_layer_config``, and a removed attention or MLP sublayer with that convention's ``skip`` entry
(``{"skip": ["attention"]}``); stock model classes do not build from either yet. The classes here are the
stock Llama / Mistral / Qwen2 / Qwen3 causal-LM classes with one change: each decoder layer is built from
its own resolved layer config, without the sublayers it skips (the residual stream passes them unchanged).
The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, GraniteMoeHybrid) get the same
change, so that layers may keep different numbers of experts (``num_experts``) and expert widths, and lose their
attention block or their whole MoE block (``"mlp"``: the routed experts with any shared expert or shared MLP).
Their config classes also accept head counts that do not divide ``hidden_size`` (``head_dim`` is explicit),
which stock ``LlamaConfig`` refuses.

This file is self-contained (torch, transformers and its huggingface_hub only): gqa-prune copies it next to the weights,
so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works in tools that never
import gqa_prune (lm-eval, GPTQModel, ...). ``import gqa_prune`` registers the same classes in-process.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridDecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer
from transformers.models.olmoe.modeling_olmoe import OlmoeDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"
# per_layer_config "skip" names -> (block, the norm in front of it) on the decoder layer
SKIPPABLE_SUBLAYERS = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}


def _validate_head_layout(config) -> None:
    """Every layer must keep whole GQA groups: query heads a multiple of KV heads, head_dim explicit."""
    if getattr(config, "head_dim", None) in (None, 0):
        raise ValueError("A GQA-pruned config needs an explicit head_dim.")
    layer_configs = config.per_layer_config if config.is_heterogeneous else [config]
    for index, layer_config in enumerate(layer_configs):
        skipped = _skipped(layer_config)
        unknown = skipped - set(SKIPPABLE_SUBLAYERS)
        if unknown:
            raise ValueError(f"layer {index}: cannot skip {sorted(unknown)}; skippable: {sorted(SKIPPABLE_SUBLAYERS)}")
        if "attention" in skipped and len(set(getattr(config, "layer_types", None) or ["full_attention"])) > 1:
            raise ValueError("a layer without attention needs every layer of the same attention type (layer_types)")
        heads, kv_heads = layer_config.num_attention_heads, layer_config.num_key_value_heads
        if kv_heads < 1 or heads % kv_heads != 0:
            raise ValueError(
                f"layer {index}: {heads} query heads are not a whole number of groups of {kv_heads} KV heads"
            )


@contextlib.contextmanager
def _quiet_global_per_layer_reads():
    """The stock constructor reads the global (dense) sizes once; the layers it builds are replaced."""
    heterogeneity_logger = logging.getLogger(_HETEROGENEITY_LOGGER)
    previous_level = heterogeneity_logger.level
    heterogeneity_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        heterogeneity_logger.setLevel(previous_level)


def _skipped(layer_config) -> set[str]:
    return set(getattr(layer_config, "skip", None) or ())


def sublayer_attributes(layer: nn.Module, name: str) -> tuple[str, ...]:
    """The attributes of a decoder layer that make up sublayer ``name`` (its block(s), then the norm in front)."""
    return getattr(layer, "skippable_sublayers", SKIPPABLE_SUBLAYERS)[name]


def skip_sublayer(layer: nn.Module, name: str) -> None:
    """Remove a decoder layer's attention or MLP block and the norm in front of it."""
    for attribute in sublayer_attributes(layer, name):
        setattr(layer, attribute, None)


def assign_cache_indices(layers) -> None:
    """Number the attention blocks 0, 1, ... in order, skipping layers without attention.

    The KV cache keeps one slot per index and reads the sequence length from slot 0, so the first layer
    that still has attention must write slot 0 (a layer without attention never writes its slot).
    """
    index = 0
    for layer in layers:
        if layer.self_attn is not None:
            layer.self_attn.layer_idx = index
            index += 1


def _build_layers_from_per_layer_config(decoder: nn.Module, config, decoder_layer_class: type) -> None:
    """Replace every decoder layer with one built from its own resolved config, without skipped sublayers."""
    for layer_index in range(config.num_hidden_layers):
        layer_config = config.per_layer_config[layer_index]
        layer = decoder_layer_class(layer_config, layer_index)
        for name in sorted(_skipped(layer_config)):
            skip_sublayer(layer, name)
        if layer.self_attn is not None:
            # Attention reads the implementation (eager/sdpa/...) from its config at run time: share the
            # model's config so set_attn_implementation() keeps reaching every layer.
            layer.self_attn.config = config
        decoder.layers[layer_index] = layer
    if any("attention" in _skipped(config.per_layer_config[i]) for i in range(config.num_hidden_layers)):
        assign_cache_indices(decoder.layers)  # else the stock numbering stands (hybrid caches index every layer)


class _SkippableSublayersMixin:
    """A decoder layer that may lack its attention or MLP block (attribute None): the residual passes it."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.self_attn is not None and self.mlp is not None:  # a whole layer: exactly the stock code
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        if self.self_attn is not None:
            attention_output, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attention_output
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class _SkippableMoeSublayersMixin:
    """A mixture-of-experts decoder layer that may lack its attention block or its MoE block (the norm in front
    of a skipped block is None too): the residual stream passes what is absent. A whole layer runs the stock
    code; otherwise the stock order of operations, including Granite's ``residual_multiplier`` and gpt-oss's
    MLP that also returns its router scores."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.input_layernorm is not None and self.post_attention_layernorm is not None:
            return super().forward(hidden_states, **kwargs)
        scale = getattr(self, "residual_multiplier", 1.0)
        if self.input_layernorm is not None:
            mixed = self.input_layernorm(hidden_states)
            if getattr(self, "mamba", None) is not None:  # Granite's state-space layers, called as the stock layer does
                extra = {k: v for k, v in kwargs.items() if k not in ("use_cache", "position_embeddings")}
                extra["cache_params"] = extra.pop("past_key_values", None)
                mixed = self.mamba(hidden_states=mixed, **extra)
            else:
                mixed, _ = self.self_attn(hidden_states=mixed, **kwargs)
            hidden_states = hidden_states + mixed * scale
        if self.post_attention_layernorm is not None:
            normed = self.post_attention_layernorm(hidden_states)
            if hasattr(self, "block_sparse_moe"):  # Granite: routed experts beside a dense shared MLP
                fed = self.shared_mlp(normed)
                if self.block_sparse_moe is not None:
                    fed = self.block_sparse_moe(normed) + fed
            else:
                fed = self.mlp(normed)
                fed = fed[0] if isinstance(fed, tuple) else fed  # gpt-oss: (output, router scores)
            hidden_states = hidden_states + fed * scale
        return hidden_states


class _HeadLayoutValidationMixin:
    """Validate whole GQA groups per layer instead of hidden_size % num_attention_heads (head_dim is explicit)."""

    def validate_architecture(self):
        _validate_head_layout(self)

    def validate_token_ids(self):
        """The stock check reads every attribute, per-layer sizes included (a warning each on a heterogeneous
        config); the special-token ids are all it needs."""
        values = self.__dict__
        vocab_size = values.get("vocab_size")
        for name, value in values.items():
            if name.endswith("_token_id") and isinstance(value, int) and vocab_size and not 0 <= value < vocab_size:
                logging.getLogger(__name__).warning(
                    "Model config: %s must be None or an integer within the vocabulary (0..%d), got %d",
                    name, vocab_size - 1, value,
                )  # fmt: skip


class _PerLayerShapesMixin:
    """Build each decoder layer from ``config.per_layer_config`` after the stock constructor ran."""

    _decoder_layer_class: type

    def __init__(self, config):
        _validate_head_layout(config)
        with _quiet_global_per_layer_reads():
            super().__init__(config)
        if config.is_heterogeneous:
            _build_layers_from_per_layer_config(self.model, config, self._decoder_layer_class)
            self.post_init()


@strict  # re-collects class validators, so the mixin's validate_architecture replaces the stock one
class GQAPrunedLlamaConfig(_HeadLayoutValidationMixin, LlamaConfig):
    model_type = "gqa_pruned_llama"


@strict  # re-collects class validators, so the mixin's validate_architecture replaces the stock one
class GQAPrunedMistralConfig(_HeadLayoutValidationMixin, MistralConfig):
    model_type = "gqa_pruned_mistral"


@strict  # re-collects class validators, so the mixin's validate_architecture replaces the stock one
class GQAPrunedQwen2Config(_HeadLayoutValidationMixin, Qwen2Config):
    model_type = "gqa_pruned_qwen2"


@strict  # re-collects class validators, so the mixin's validate_architecture replaces the stock one
class GQAPrunedQwen3Config(_HeadLayoutValidationMixin, Qwen3Config):
    model_type = "gqa_pruned_qwen3"


class GQAPrunedLlamaDecoderLayer(_SkippableSublayersMixin, LlamaDecoderLayer):
    pass


class GQAPrunedMistralDecoderLayer(_SkippableSublayersMixin, MistralDecoderLayer):
    pass


class GQAPrunedQwen2DecoderLayer(_SkippableSublayersMixin, Qwen2DecoderLayer):
    pass


class GQAPrunedQwen3DecoderLayer(_SkippableSublayersMixin, Qwen3DecoderLayer):
    pass


class GQAPrunedLlamaForCausalLM(_PerLayerShapesMixin, LlamaForCausalLM):
    config_class = GQAPrunedLlamaConfig
    _decoder_layer_class = GQAPrunedLlamaDecoderLayer


class GQAPrunedMistralForCausalLM(_PerLayerShapesMixin, MistralForCausalLM):
    config_class = GQAPrunedMistralConfig
    _decoder_layer_class = GQAPrunedMistralDecoderLayer


class GQAPrunedQwen2ForCausalLM(_PerLayerShapesMixin, Qwen2ForCausalLM):
    config_class = GQAPrunedQwen2Config
    _decoder_layer_class = GQAPrunedQwen2DecoderLayer


class GQAPrunedQwen3ForCausalLM(_PerLayerShapesMixin, Qwen3ForCausalLM):
    config_class = GQAPrunedQwen3Config
    _decoder_layer_class = GQAPrunedQwen3DecoderLayer


# family name -> (config class, causal-LM class); read by gqa_prune.arch
PRUNED_CLASSES = {
    "llama": (GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM),
    "mistral": (GQAPrunedMistralConfig, GQAPrunedMistralForCausalLM),
    "qwen2": (GQAPrunedQwen2Config, GQAPrunedQwen2ForCausalLM),
    "qwen3": (GQAPrunedQwen3Config, GQAPrunedQwen3ForCausalLM),
}


def _moe_classes(
    name: str, config_class: type, model_class: type, decoder_layer_class: type, mlp_attributes: tuple[str, ...]
) -> tuple[type, type]:
    """The pruned classes of a mixture-of-experts family: per-layer expert counts and widths from
    ``per_layer_config``, and decoder layers that may skip their attention block or their MoE block (whose
    attributes, norm last, are ``mlp_attributes``)."""
    skippable = {**SKIPPABLE_SUBLAYERS, "mlp": mlp_attributes}
    pruned_layer = type(f"GQAPruned{name}DecoderLayer", (_SkippableMoeSublayersMixin, decoder_layer_class), {
        "skippable_sublayers": skippable, "__module__": __name__,
    })  # fmt: skip
    pruned_config = strict(
        type(f"GQAPruned{name}Config", (_HeadLayoutValidationMixin, config_class), {
            "model_type": f"gqa_pruned_{config_class.model_type}", "__module__": __name__,
        })
    )  # fmt: skip
    pruned_model = type(f"GQAPruned{name}ForCausalLM", (_PerLayerShapesMixin, model_class), {
        "config_class": pruned_config, "_decoder_layer_class": pruned_layer, "__module__": __name__,
    })  # fmt: skip
    return pruned_config, pruned_model


_MOE_BLOCK = SKIPPABLE_SUBLAYERS["mlp"]  # the MoE block sits where a dense model's MLP does
GQAPrunedMixtralConfig, GQAPrunedMixtralForCausalLM = _moe_classes(
    "Mixtral", MixtralConfig, MixtralForCausalLM, MixtralDecoderLayer, _MOE_BLOCK
)
GQAPrunedQwen2MoeConfig, GQAPrunedQwen2MoeForCausalLM = _moe_classes(
    "Qwen2Moe", Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeDecoderLayer, _MOE_BLOCK
)
GQAPrunedQwen3MoeConfig, GQAPrunedQwen3MoeForCausalLM = _moe_classes(
    "Qwen3Moe", Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeDecoderLayer, _MOE_BLOCK
)
GQAPrunedOlmoeConfig, GQAPrunedOlmoeForCausalLM = _moe_classes(
    "Olmoe", OlmoeConfig, OlmoeForCausalLM, OlmoeDecoderLayer, _MOE_BLOCK
)
GQAPrunedGptOssConfig, GQAPrunedGptOssForCausalLM = _moe_classes(
    "GptOss", GptOssConfig, GptOssForCausalLM, GptOssDecoderLayer, _MOE_BLOCK
)
GQAPrunedGraniteMoeHybridConfig, GQAPrunedGraniteMoeHybridForCausalLM = _moe_classes(
    "GraniteMoeHybrid",
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    GraniteMoeHybridDecoderLayer,
    ("block_sparse_moe", "shared_mlp", "post_attention_layernorm"),
)
# mixture-of-experts family (model_type) -> (config class, causal-LM class) for per-layer expert counts and widths
PRUNED_MOE_CLASSES = {
    "mixtral": (GQAPrunedMixtralConfig, GQAPrunedMixtralForCausalLM),
    "qwen2_moe": (GQAPrunedQwen2MoeConfig, GQAPrunedQwen2MoeForCausalLM),
    "qwen3_moe": (GQAPrunedQwen3MoeConfig, GQAPrunedQwen3MoeForCausalLM),
    "olmoe": (GQAPrunedOlmoeConfig, GQAPrunedOlmoeForCausalLM),
    "gpt_oss": (GQAPrunedGptOssConfig, GQAPrunedGptOssForCausalLM),
    "granitemoehybrid": (GQAPrunedGraniteMoeHybridConfig, GQAPrunedGraniteMoeHybridForCausalLM),
}
# family name -> decoder layer that runs without a skipped sublayer; read by gqa_prune.arch and expert surgery
PRUNED_DECODER_LAYERS = {
    family: model_class._decoder_layer_class
    for family, (_, model_class) in {**PRUNED_CLASSES, **PRUNED_MOE_CLASSES}.items()
}
