"""Save pruned models as Hugging Face checkpoints (safetensors + JSON), with a model card.

A model whose layers all have the same shape gets a stock config that any tool loads. Otherwise (or when
the stock config refuses the shape: stock ``LlamaConfig`` wants ``hidden_size`` divisible by the head
count even with an explicit ``head_dim``) the checkpoint uses the project's model class: per-layer sizes in
``per_layer_config``, ``auto_map`` in config.json and ``modeling_gqa_prune.py`` beside the weights, so it
loads after ``import gqa_prune`` or with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import adapter_for, geometry_of
from .atomic import atomic_dir
from .expert_plan import ExpertPlan
from .moe import expert_geometry_of, moe_family_for
from .planning import PruningPlan
from .sources import PROVENANCE_FILE

logger = logging.getLogger(__name__)

PLAN_FILE = "pruning_plan.json"
_CONFIG_KEYS_NOT_PASSED = ("model_type", "architectures", "auto_map", "transformers_version")


def _rebuilt_config(config_class: type, config) -> object:
    """A new config of ``config_class`` with the same values (validated by that class)."""
    values = {key: value for key, value in config.to_dict().items() if key not in _CONFIG_KEYS_NOT_PASSED}
    rebuilt = config_class.from_dict(values)
    rebuilt._attn_implementation = config._attn_implementation
    return rebuilt


def set_model_config(model: PreTrainedModel, config) -> None:
    """Give ``model`` and every pretrained submodule (its base model) the same config: saving and loading look
    up weight conversions by each submodule's model_type, so a stale inner config would save keys the class
    then cannot load."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config = config


def to_export_form(model: PreTrainedModel) -> str:
    """Give ``model`` the config and model class its checkpoint is saved with; returns "stock" or "gqa-prune".

    The project's model class only differs from the stock one in how ``__init__`` builds layers, and the
    pruned modules already have their final shapes, so switching the class of the live model is exact.
    """
    adapter = adapter_for(model.config)
    if not isinstance(model, adapter.model_class):
        raise TypeError(f"expected a {adapter.model_class.__name__}, got {type(model).__name__}")
    if not model.config.is_heterogeneous:
        try:
            stock_config = _rebuilt_config(adapter.model_class.config_class, model.config)
        except StrictDataclassError as refusal:  # the stock config's own validation
            reason = str(refusal).strip().splitlines()[-1].strip()
            logger.info(
                "stock %s config refuses this shape (%s); saving with the gqa-prune class", adapter.family, reason
            )
        else:
            set_model_config(model, stock_config)
            model.__class__ = adapter.model_class
            return "stock"
    set_model_config(model, _rebuilt_config(adapter.pruned_config_class, model.config))
    model.config.allow_global_per_layer_attribute_access = True
    model.__class__ = adapter.pruned_model_class
    return "gqa-prune"


def to_expert_export_form(model: PreTrainedModel) -> str:
    """Give a mixture-of-experts model with per-layer expert counts or widths the project's class (its
    checkpoint then ships modeling_gqa_prune.py); returns "stock" or "gqa-prune"."""
    from .modeling_gqa_prune import PRUNED_MOE_CLASSES

    if not model.config.is_heterogeneous:
        return "stock"
    config_class, model_class = PRUNED_MOE_CLASSES[moe_family_for(model.config).family]
    set_model_config(model, _rebuilt_config(config_class, model.config))
    model.config.allow_global_per_layer_attribute_access = True
    model.__class__ = model_class
    return "gqa-prune"


def model_card(plan: PruningPlan, source: str, config_kind: str, model_name: str) -> str:
    """README.md for a pruned checkpoint: where it came from, the plan, parameters before/after, how to load."""
    summary = plan.param_summary()
    settings = plan.settings
    pruned = plan.pruned_geometry()
    config_description = (
        "stock (every layer has the same shape)"
        if config_kind == "stock"
        else "per-layer shapes in `per_layer_config`, model class in `modeling_gqa_prune.py`"
    )
    load_line = (
        "AutoModelForCausalLM.from_pretrained(path)  # stock config, any tool"
        if config_kind == "stock"
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or `import gqa_prune` first"
    )
    protected = ", ".join(map(str, settings.protected_layers)) or "none"
    base_model = f"base_model: {source}\n" if source.count("/") == 1 and not source.startswith((".", "/")) else ""
    return f"""---
{base_model}library_name: transformers
tags:
- gqa-prune
- structured-pruning
- pruned
---
# {model_name} (GQA-aware structured pruning)

Pruned by gqa-prune from `{source}` ({settings.mode} plan). {_what_went(plan)} Weights are not fine-tuned
after pruning.

| | before | after |
|---|---:|---:|
| parameters | {summary["params_before"]:,} | {summary["params_after"]:,} |
| decoder layers | {plan.geometry.num_layers} | {pruned.num_layers} |
| attention parameters | {summary["attention_params_before"]:,} | {summary["attention_params_after"]:,} |
| MLP parameters | {summary["mlp_params_before"]:,} | {summary["mlp_params_after"]:,} |
| KV groups per layer | {_span(plan.geometry.kv_groups)} | {_span(pruned.kv_groups)} |
| MLP channels per layer | {_span(plan.geometry.intermediate_sizes)} | {_span(pruned.intermediate_sizes)} |

Removed {summary["achieved_ratio"]:.2%} of attention+MLP parameters (attention {summary["achieved_attn_ratio"]:.2%},
MLP {summary["achieved_mlp_ratio"]:.2%}): {summary["layers_removed"]} whole layers, {summary["attn_sublayers_removed"]}
attention and {summary["mlp_sublayers_removed"]} MLP sublayers; asked for {_asked(settings)}.

Plan: unit criterion `{settings.criterion}`, layer criterion `{settings.layer_criterion}`, strategy
`{settings.strategy}` (alpha {settings.alpha}, rates {settings.min_rate}..{settings.max_rate}), protected layers
{protected}, MLP widths in multiples of {settings.channel_multiple}. The full plan, with what each layer lost
and why, is in `{PLAN_FILE}`.

Config: {config_description}.

```python
from transformers import AutoModelForCausalLM
model = {load_line}
```
"""


def _what_went(plan: PruningPlan) -> str:
    parts = []
    if any(
        layer.keeps("attn") and len(layer.kept_kv_groups) < plan.geometry.kv_groups[layer.layer]
        for layer in plan.layers
    ):
        parts.append(
            f"Attention lost whole GQA groups (a KV head with its {plan.geometry.heads_per_group} query heads), so "
            "every kept query head still reads its own KV head."
        )
    if plan.param_summary()["achieved_mlp_ratio"] > 0:
        parts.append("MLPs lost whole channels or whole sublayers.")
    if plan.param_summary()["layers_removed"]:
        parts.append("Whole decoder layers were removed.")
    return " ".join(parts)


def _asked(settings) -> str:
    if settings.mode == "width":
        attention, mlp = settings.width_ratios
        return f"attention {attention}, MLP {mlp}"
    return f"{settings.ratio} of attention+MLP parameters, split by the scores"


def _span(values) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: PruningPlan | ExpertPlan,
    out_dir: str | os.PathLike,
    source: str,
    provenance: dict | None = None,
    card_sections: Sequence[str] = (),
    write_extra: Callable[[Path], None] | None = None,
    kind: str = "prune",
) -> Path:
    """Write the pruned model (a unit plan's or an expert plan's), tokenizer, plan, provenance and model card into
    ``out_dir`` atomically.

    ``provenance`` adds keys to gqa_prune.json (e.g. how the model was recovered), ``card_sections`` adds
    Markdown to the model card, ``write_extra`` writes further files into the folder before it is renamed;
    ``kind`` is the sub-command named in the output's marker (prune, recover).
    """
    if isinstance(plan, ExpertPlan):  # a mixture of experts: stock config unless per-layer counts or widths
        expected, actual = plan.pruned_geometry(), expert_geometry_of(model)
        unrecorded = {name: () for name in ("layer_params", "sublayer_params") if not getattr(expected, name)}
        actual = replace(actual, **unrecorded)  # a plan from scores written before layer sizes were recorded
        if actual != expected:
            raise ValueError("model experts do not match the plan's pruned experts; apply the plan before saving")
        config_kind = to_expert_export_form(model)
        summary, card = plan.summary(), expert_model_card(plan, source, config_kind, Path(out_dir).name)
    else:
        if geometry_of(model) != plan.pruned_geometry():
            raise ValueError("model shape does not match the plan's pruned shape; apply the plan before saving")
        config_kind = to_export_form(model)
        summary, card = plan.param_summary(), model_card(plan, source, config_kind, Path(out_dir).name)
    record = {"source": source, "config": config_kind, **summary, **(provenance or {})}
    _write_checkpoint(model, tokenizer, plan, out_dir, kind, record, card, card_sections, write_extra)
    logger.info("saved pruned model (%s config) -> %s", config_kind, out_dir)
    return Path(out_dir)


def _write_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan,
    out_dir: str | os.PathLike,
    kind: str,
    record: dict,
    card: str,
    card_sections: Sequence[str],
    write_extra: Callable[[Path], None] | None,
) -> None:
    """Weights, tokenizer, plan, provenance (``record``) and card into ``out_dir`` atomically."""
    with atomic_dir(Path(out_dir), kind) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        plan.save(temporary / PLAN_FILE)
        (temporary / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (temporary / "README.md").write_text(card + "".join(f"\n{section}\n" for section in card_sections))
        if write_extra is not None:
            write_extra(temporary)


def expert_model_card(plan, source: str, config_kind: str, model_name: str) -> str:
    """README.md for an expert-pruned checkpoint: experts and widths before/after, the criterion, how to load."""
    summary = plan.summary()
    before, after = plan.geometry, plan.pruned_geometry()
    moe = before.moe_layers
    channels = (
        f" and {plan.channel_ratio} of every kept expert's intermediate channels (each expert its lowest-scored)"
        if plan.channels is not None
        else ""
    )
    groups = "GQA groups (a KV head with its query heads; those writing least to the residual stream)"
    shared = " and shared MLPs lost channels" if plan.shared_channels else ""
    if plan.groups is None:
        attention = "Attention, shared experts, dense MLP"
    elif plan.allocation == "per-layer":
        attention = f"Attention layers lost {groups}{shared}, as priced per layer. " + (
            "Dense MLP" if shared else "Shared experts, dense MLP"
        )
    else:
        each = " and every shared MLP as much of its channels" if shared else ""
        attention = f"Every attention layer lost {plan.width_ratio} of its {groups}{each}. " + (
            "Dense MLP" if shared else "Shared experts, dense MLP"
        )
    groups_row = ""
    if plan.groups is not None:
        groups_row += (
            f"| KV heads per attention layer | {_moe_span(before.kv_groups, before.attention_layers)} | "
            f"{_moe_span(after.kv_groups, after.attention_layers)} |\n"
        )
    if plan.shared_channels is not None:
        shared = [layer for layer, width in enumerate(before.shared_widths) if width]
        groups_row += (
            f"| shared-MLP channels | {_moe_span(before.shared_widths, shared)} | "
            f"{_moe_span(after.shared_widths, [i for i, width in enumerate(after.shared_widths) if width])} |\n"
        )
    allocation = {
        "uniform": "every mixture-of-experts layer lost the same number of routed experts",
        "ranked": "routed experts were ranked across all mixture-of-experts layers, so layers lost different numbers",
        "per-layer": "what was removed was split between layers"
        + (", and between experts, GQA groups and shared-MLP channels," if plan.width_ratio else "")
        + " by each one's measured calibration loss per parameter, so layers lost different numbers",
    }[plan.allocation]
    removed = (
        f", but for the decoder layers removed whole ({', '.join(map(str, plan.removed_layers))}: original indices)"
        if plan.removed_layers
        else ""
    )
    if plan.removed_sublayers:
        blocks = ", ".join(
            f"{layer} {'attention' if name == 'attention' else 'MoE'}" for layer, name in plan.removed_sublayers
        )
        removed += f"; single blocks removed (the residual stream passes them): {blocks} (original layer indices)"
    if config_kind == "stock":
        config_line = "stock (one expert count and width for every layer), so any tool loads it with no custom code"
        load_line = "AutoModelForCausalLM.from_pretrained(path)"
    else:
        config_line = (
            "per-layer expert counts, widths, attention heads or removed blocks (`skip`) in `per_layer_config`, "
            "model class in "
            "`modeling_gqa_prune.py` (stock transformers does not build per-layer shapes of these yet)"
        )
        load_line = "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or `import gqa_prune` first"
    return f"""---
library_name: transformers
tags:
- gqa-prune
- expert-pruning
- pruned
---
# {model_name} (expert pruning)

Pruned by gqa-prune from `{source}`: {allocation}, the lowest-scored under `{plan.criterion}` on calibration
data{channels}. {len(moe)} of {before.num_layers} layers have experts. {attention}
layers and state-space layers are unchanged{removed}. Weights are not fine-tuned after pruning.

| | before | after |
|---|---:|---:|
| parameters | {summary["params_before"]:,} | {summary["params_after"]:,} |
| experts per MoE layer | {_moe_span(before.experts, moe)} | {_moe_span(after.experts, after.moe_layers)} |
| channels per expert | {_moe_span(before.widths, moe)} | {_moe_span(after.widths, after.moe_layers)} |
| decoder layers | {before.num_layers} | {after.num_layers} |
| experts routed per token | {before.top_k} | {before.top_k} |
{groups_row}
Asked for an expert ratio of {plan.expert_ratio}; removed {summary["achieved_expert_ratio"]:.2%} of the experts.
Which experts each layer kept (original indices, in order) and their channels are in `{PLAN_FILE}`.

Config: {config_line}.

```python
from transformers import AutoModelForCausalLM
model = {load_line}
```
"""


def _moe_span(values, layers) -> str:
    return _span([values[layer] for layer in layers])
