"""Model classes for GQA-pruned checkpoints (written by gqa-prune).

A pruned model whose decoder layers differ in shape records the per-layer sizes with transformers'
``per_layer_config``; stock model classes do not build from it yet. The classes here are the stock
Llama / Mistral / Qwen2 / Qwen3 causal-LM classes with one change: each decoder layer is built from its
own resolved layer config. Their config classes also accept head counts that do not divide
``hidden_size`` (``head_dim`` is explicit), which stock ``LlamaConfig`` refuses.

This file is self-contained (torch, transformers and its huggingface_hub only): gqa-prune copies it next to the weights,
so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works in tools that never
import gqa_prune (lm-eval, GPTQModel, ...). ``import gqa_prune`` registers the same classes in-process.
"""

from __future__ import annotations

import contextlib
import logging

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


def _validate_head_layout(config) -> None:
    """Every layer must keep whole GQA groups: query heads a multiple of KV heads, head_dim explicit."""
    if getattr(config, "head_dim", None) in (None, 0):
        raise ValueError("A GQA-pruned config needs an explicit head_dim.")
    layer_configs = config.per_layer_config if config.is_heterogeneous else [config]
    for index, layer_config in enumerate(layer_configs):
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


def _build_layers_from_per_layer_config(decoder: nn.Module, config, decoder_layer_class: type) -> None:
    """Replace every decoder layer with one built from its own resolved config."""
    for layer_index in range(config.num_hidden_layers):
        layer = decoder_layer_class(config.per_layer_config[layer_index], layer_index)
        # Attention reads the implementation (eager/sdpa/...) from its config at run time: share the
        # model's config so set_attn_implementation() keeps reaching every layer.
        layer.self_attn.config = config
        decoder.layers[layer_index] = layer


class _HeadLayoutValidationMixin:
    """Validate whole GQA groups per layer instead of hidden_size % num_attention_heads (head_dim is explicit)."""

    def validate_architecture(self):
        _validate_head_layout(self)


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


class GQAPrunedLlamaForCausalLM(_PerLayerShapesMixin, LlamaForCausalLM):
    config_class = GQAPrunedLlamaConfig
    _decoder_layer_class = LlamaDecoderLayer


class GQAPrunedMistralForCausalLM(_PerLayerShapesMixin, MistralForCausalLM):
    config_class = GQAPrunedMistralConfig
    _decoder_layer_class = MistralDecoderLayer


class GQAPrunedQwen2ForCausalLM(_PerLayerShapesMixin, Qwen2ForCausalLM):
    config_class = GQAPrunedQwen2Config
    _decoder_layer_class = Qwen2DecoderLayer


class GQAPrunedQwen3ForCausalLM(_PerLayerShapesMixin, Qwen3ForCausalLM):
    config_class = GQAPrunedQwen3Config
    _decoder_layer_class = Qwen3DecoderLayer


# family name -> (config class, causal-LM class); read by gqa_prune.arch
PRUNED_CLASSES = {
    "llama": (GQAPrunedLlamaConfig, GQAPrunedLlamaForCausalLM),
    "mistral": (GQAPrunedMistralConfig, GQAPrunedMistralForCausalLM),
    "qwen2": (GQAPrunedQwen2Config, GQAPrunedQwen2ForCausalLM),
    "qwen3": (GQAPrunedQwen3Config, GQAPrunedQwen3ForCausalLM),
}
