"""The layer maps GPTQModel quantizes gqa-prune's checkpoints with: its own, corrected where it fails on
transformers 5's layouts, and extended to the project's ``gqa_pruned_*`` model types.

GPTQModel picks a model definition (which projections to quantize, in which order) by ``model_type``, and has
Defuser split fused expert tensors into one linear layer per expert projection. Measured with gptqmodel 7.6,
defuser 0.0.28 and transformers 5.23 on tiny models of every supported family:

- **Qwen2-MoE**: GPTQModel expands every name of the subset that holds the routed experts once per expert, the
  shared expert's too, and then finds its quantized state gone the second time (``KeyError: 'q_zeros'``); a
  layer in ``mlp_only_layers`` (a dense MLP) is not in its map at all. Corrected: each name once, and the dense
  MLP's projections as an alternative to the sparse block's (missing modules skipped, as GPTQModel does for
  DeepSeek's dense layers).
- **GraniteMoeHybrid**: its definition patches a Mamba ``torch_forward`` that transformers 5 no longer has
  (the stock forward already runs quantized projections on CPU), and names the experts ``input_linear.<e>`` /
  ``output_linear.<e>`` where Defuser now makes ``experts.<e>.gate_proj/up_proj/down_proj``: the experts stayed
  in float and only expert 0 was written. Corrected: the patch only where the method exists, the map of
  transformers 5's layout.
- **gqa_pruned_*** (the project's heterogeneous classes): the family's map, registered under the pruned type;
  for mixtures of experts also Defuser's generic expert splitting, missing experts skipped (a layer keeps fewer
  experts than ``num_experts``), and the expert implementation Defuser selects shared with the per-layer
  configs the experts read it from.

``quantize`` checks what GPTQModel wrote against its source afterwards (``gptq_format.unquantized_projections``),
so a layout none of this foresees fails in one line instead of leaving projections in float.
"""

from __future__ import annotations

from torch import nn

from .modeling_gqa_prune import PRUNED_CLASSES, PRUNED_MOE_CLASSES

_GATE_UP_DOWN = ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1")


def _qwen2_moe_definition(base: type) -> type:
    class Qwen2MoeLayers(base):
        layer_modules_strict = False  # a dense layer (mlp_only_layers) has no sparse block, and the reverse
        module_tree = [
            "model",
            "layers",
            "#",
            {
                "input_layernorm": ("input_layernorm:!",),
                "self_attn": ("q_proj:0:in=x", "k_proj:0:in=x", "v_proj:0:in=x", "o_proj:1"),
                "post_attention_layernorm": ("post_attention_layernorm:!",),
                "mlp:moe:?": {
                    "": _GATE_UP_DOWN,  # a layer of mlp_only_layers: a dense MLP
                    "gate": ("gate:!",),
                    "shared_expert_gate": ("shared_expert_gate:!",),
                    "shared_expert:0": _GATE_UP_DOWN,
                    "experts:0": {"#": _GATE_UP_DOWN},
                },
            },
        ]

        @classmethod
        def build_moe_modules_if_need(cls, model_config, layer_modules, is_awq_quantize: bool = False):
            subsets = super().build_moe_modules_if_need(model_config, layer_modules, is_awq_quantize)
            return [list(dict.fromkeys(names)) for names in subsets]  # the shared expert's names once

    return Qwen2MoeLayers


def _granitemoehybrid_definition(base: type) -> type:
    class GraniteMoeHybridLayers(base):
        module_tree = [
            "model",
            "layers",
            "#",
            {
                "input_layernorm": ("input_layernorm:!",),
                "mamba": ("in_proj:0", "out_proj:1"),
                "self_attn": ("q_proj:0", "k_proj:0", "v_proj:0", "o_proj:1"),
                "post_attention_layernorm": ("post_attention_layernorm:!",),
                "block_sparse_moe:moe:?": {
                    "router": ("router:!",),
                    "experts": {"#": ("gate_proj:0", "up_proj:0", "down_proj:1")},
                },
                "shared_mlp": ("input_linear:0", "output_linear:1"),
            },
        ]

        def monkey_patch(self):
            if hasattr(type(self.model.model.layers[0].mamba), "torch_forward"):
                super().monkey_patch()

    return GraniteMoeHybridLayers


_CORRECTIONS = {"qwen2_moe": _qwen2_moe_definition, "granitemoehybrid": _granitemoehybrid_definition}


def _share_experts_implementation(cls, model: nn.Module) -> None:
    """Defuser selects its per-expert forward on ``model.config``; the experts of the pruned classes read it
    from their layer's own config."""
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation is None:
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and config is not model.config:
            config._experts_implementation = implementation


def _pruned_moe_definition(base: type) -> type:
    return type(
        f"Pruned{base.__name__}",
        (base,),
        {
            "layer_modules_strict": False,  # layers keep fewer experts than the config's num_experts
            "after_defuser_conversion": classmethod(_share_experts_implementation),
            "__module__": __name__,
        },
    )


def register(auto, defuser_models: dict) -> None:
    """Correct and extend GPTQModel's ``auto.MODEL_MAP`` and Defuser's ``MODEL_CONFIG`` (idempotent)."""
    for family, correct in _CORRECTIONS.items():
        if not getattr(auto.MODEL_MAP[family], "gqa_prune_corrected", False):
            auto.MODEL_MAP[family] = correct(auto.MODEL_MAP[family])
            auto.MODEL_MAP[family].gqa_prune_corrected = True
    pruned = {family: config_class.model_type for family, (config_class, _) in PRUNED_CLASSES.items()}
    pruned_moe = {family: config_class.model_type for family, (config_class, _) in PRUNED_MOE_CLASSES.items()}
    for family, model_type in {**pruned, **pruned_moe}.items():
        if model_type in auto.MODEL_MAP:
            continue
        definition = auto.MODEL_MAP[family]
        if family in pruned_moe:
            definition = _pruned_moe_definition(definition)
            # Defuser's generic splitting of experts (not the stock class patch: the layers are the project's)
            defuser_models[model_type] = {
                key: value for key, value in defuser_models.get(family, {}).items() if key == "min_transformers_version"
            }
        auto.MODEL_MAP[model_type] = definition
        auto.SUPPORTED_MODELS.append(model_type)
