"""Checkpoints: save -> load gives identical logits (registered class, trust_remote_code, stock config)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, calibration_ids, logits_in_fresh_process, parameter_count, plan_for, tiny_model
from transformers import AutoModelForCausalLM

from gqa_prune.checkpoint import PLAN_FILE, save_pruned
from gqa_prune.planning import PruningPlan
from gqa_prune.sources import load_model
from gqa_prune.surgery import apply_plan

INPUTS = calibration_ids(blocks=2, length=10, seed=3)


def _pruned_checkpoint(tmp_path, tiny_tokenizer, family, heads_per_group, **plan_settings):
    model = tiny_model(family, heads_per_group, vocab_size=len(tiny_tokenizer))
    plan = plan_for(model, **plan_settings)
    apply_plan(model, plan)
    expected = model(INPUTS).logits
    folder = tmp_path / f"{family}-pruned"
    save_pruned(model, tiny_tokenizer, plan, folder, source="org/tiny")
    return folder, plan, expected


def _logits_in_fresh_process(folder, tmp_path, inputs=INPUTS) -> torch.Tensor:
    """Load with trust_remote_code=True in a new interpreter that never imports gqa_prune."""
    load = f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    logits, printed, errors = logits_in_fresh_process(tmp_path, inputs, load)
    assert "modeling_gqa_prune" in printed  # the class came from the file shipped in the checkpoint
    # quiet: transformers' warnings about per-layer attributes read globally never appear
    assert "per-layer attribute" not in errors and "Reading global config value" not in errors, errors
    return logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heterogeneous_checkpoint_reloads_with_identical_logits(tmp_path, tiny_tokenizer, family):
    folder, plan, expected = _pruned_checkpoint(tmp_path, tiny_tokenizer, family, 3, protected_layers=(0,))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"gqa_pruned_{family}"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_gqa_prune.")
    assert len(config["per_layer_config"]) == 2  # layer 0 is protected: it keeps the global (dense) shape
    assert (folder / "modeling_gqa_prune.py").is_file()
    assert PruningPlan.load(folder / PLAN_FILE) == plan

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # class registered by `import gqa_prune`
    assert torch.equal(reloaded(INPUTS).logits, expected)
    assert torch.equal(_logits_in_fresh_process(folder, tmp_path), expected)


def test_uniform_checkpoint_has_a_stock_config(tmp_path, tiny_tokenizer):
    folder, plan, expected = _pruned_checkpoint(tmp_path, tiny_tokenizer, "qwen2", 4, strategy="uniform")
    config = json.loads((folder / "config.json").read_text())
    assert plan.is_uniform
    assert config["model_type"] == "qwen2" and "auto_map" not in config and not config.get("per_layer_config")
    assert config["num_key_value_heads"] == len(plan.layers[0].kept_kv_groups)
    assert not (folder / "modeling_gqa_prune.py").exists()
    from transformers import Qwen2ForCausalLM

    assert torch.equal(Qwen2ForCausalLM.from_pretrained(folder).eval()(INPUTS).logits, expected)


def test_uniform_shape_refused_by_stock_llama_config_uses_project_class(tmp_path, tiny_tokenizer):
    # 4 -> 3 KV groups of 3 query heads: 9 heads do not divide hidden_size 48, which stock LlamaConfig rejects
    folder, plan, expected = _pruned_checkpoint(
        tmp_path, tiny_tokenizer, "llama", 3, strategy="uniform", attn_ratio=0.25, mlp_ratio=0.0
    )
    assert plan.is_uniform and len(plan.layers[0].kept_kv_groups) == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gqa_pruned_llama" and config["num_attention_heads"] == 9
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).eval()(INPUTS).logits, expected)


def test_checkpoint_is_safetensors_and_json_only_with_a_model_card(tmp_path, tiny_tokenizer):
    folder, plan, _ = _pruned_checkpoint(tmp_path, tiny_tokenizer, "llama", 3, protected_layers=(0,))
    suffixes = {path.suffix for path in folder.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".md", ".py", ".jinja", ".txt"}, suffixes
    card = (folder / "README.md").read_text()
    summary = plan.param_summary()
    assert f"{summary['params_before']:,}" in card and f"{summary['params_after']:,}" in card
    assert "base_model: org/tiny" in card and "trust_remote_code=True" in card
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied and tied embeddings
def test_recorded_parameter_counts_are_those_of_the_saved_model(tmp_path, tiny_tokenizer, family):
    folder, plan, _ = _pruned_checkpoint(tmp_path, tiny_tokenizer, family, 3, protected_layers=(0,))
    record = json.loads((folder / "gqa_prune.json").read_text())
    saved = load_model(folder, dtype="float32", device="cpu")
    assert record["params_after"] == sum(parameter.numel() for parameter in saved.parameters())
    assert record["params_before"] == parameter_count(tiny_model(family, 3, vocab_size=len(tiny_tokenizer)))
