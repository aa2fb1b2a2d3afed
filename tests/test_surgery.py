"""Surgery on tiny random models of every family and GQA layout: shapes, equivalences, generate()."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LAYOUTS, calibration_ids, parameter_count, plan_for, tiny_model

from gqa_prune.arch import geometry_of
from gqa_prune.errors import GqaPruneError
from gqa_prune.surgery import apply_plan, apply_plan_as_mask

INPUTS = calibration_ids(blocks=2, length=12, seed=1)


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
def test_plan_that_prunes_nothing_gives_identical_logits(family, heads_per_group):
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model, attn_ratio=0.0, mlp_ratio=0.0)
    before = model(INPUTS).logits
    apply_plan(model, plan)
    assert torch.equal(model(INPUTS).logits, before)
    assert parameter_count(model) == plan.params_before == plan.params_after


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
@pytest.mark.parametrize("strategy", ["inverse", "uniform"])
def test_pruned_model_equals_masked_reference(family, heads_per_group, strategy):
    model = tiny_model(family, heads_per_group)
    protected = (0,) if strategy == "inverse" else ()  # protecting a layer makes the inverse plan heterogeneous
    plan = plan_for(model, strategy=strategy, protected_layers=protected)
    assert plan.is_uniform == (strategy == "uniform")
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)

    assert parameter_count(pruned) == plan.params_after < plan.params_before
    assert geometry_of(pruned) == plan.pruned_geometry()
    for implementation in ("sdpa", "eager"):
        pruned.set_attn_implementation(implementation)
        reference.set_attn_implementation(implementation)
        difference = (pruned(INPUTS).logits - reference(INPUTS).logits).abs().max().item()
        assert difference <= 1e-5, f"{implementation}: pruned differs from masked reference by {difference}"


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
def test_every_kept_query_head_keeps_its_original_kv_head(family, heads_per_group):
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model, protected_layers=(0,))
    original = copy.deepcopy(model)
    apply_plan(model, plan)
    head_dim = 8
    for layer_plan, layer, dense in zip(plan.layers, model.model.layers, original.model.layers):
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        dense_q, dense_k = dense.self_attn.q_proj.weight, dense.self_attn.k_proj.weight
        assert q.shape[0] == len(layer_plan.kept_kv_groups) * heads_per_group * head_dim
        for new_head in range(q.shape[0] // head_dim):
            # attention pairs query head h with KV head h // heads_per_group: it must be the same pair as before
            new_group = new_head // heads_per_group
            old_group = layer_plan.kept_kv_groups[new_group]
            old_head = old_group * heads_per_group + new_head % heads_per_group
            assert old_head // heads_per_group == old_group
            assert torch.equal(
                q[new_head * head_dim : (new_head + 1) * head_dim],
                dense_q[old_head * head_dim : (old_head + 1) * head_dim],
            )
            assert torch.equal(
                k[new_group * head_dim : (new_group + 1) * head_dim],
                dense_k[old_group * head_dim : (old_group + 1) * head_dim],
            )


@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen3", 4), ("mistral", 1), ("qwen2", 3)])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_generate_with_kv_cache_matches_reference(family, heads_per_group, implementation):
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model, protected_layers=(0,))
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    for each in (pruned, reference):
        each.set_attn_implementation(implementation)
    prompt = INPUTS[:1, :5]
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected)


def test_plan_for_a_different_model_is_refused():
    plan = plan_for(tiny_model("llama", 3))
    with pytest.raises(
        GqaPruneError, match="plan does not fit this model: plan heads_per_group=3, model heads_per_group=4"
    ):
        apply_plan(tiny_model("llama", 4), plan)


def test_surgery_updates_linear_attributes_and_config():
    model = tiny_model("llama", 3)
    plan = plan_for(model, protected_layers=(0,))
    apply_plan(model, plan)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    assert model.config.is_heterogeneous
    for index, layer_plan in enumerate(plan.layers):
        layer_config = model.config.per_layer_config[index]
        assert layer_config.num_key_value_heads == len(layer_plan.kept_kv_groups)
        assert layer_config.num_attention_heads == 3 * len(layer_plan.kept_kv_groups)
        assert layer_config.intermediate_size == len(layer_plan.kept_mlp_channels)
