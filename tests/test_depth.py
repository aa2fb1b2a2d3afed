"""Depth and sublayer pruning on tiny random models of every family and GQA layout: equivalence with
references that skip what was removed, checkpoints, generate() with a KV cache, plans of every mode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import LAYOUTS, calibration_ids, parameter_count, scores_for, tiny_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from gqa_prune.arch import geometry_of
from gqa_prune.checkpoint import save_pruned
from gqa_prune.errors import GqaPruneError
from gqa_prune.passes import removal_masks, unit_masks
from gqa_prune.planning import LayerPlan, PlanSettings, PruningPlan, build_plan
from gqa_prune.surgery import apply_plan, apply_plan_as_mask

INPUTS = calibration_ids(blocks=2, length=12, seed=1)


def mixed_plan(model, *, removed_layer: int = 3) -> PruningPlan:
    """Every mix on a 5-layer model: whole layer 0; attention removed (1); MLP removed and a group lost (2);
    layer removed (3); groups and channels lost (4)."""
    geometry = geometry_of(model)
    groups, channels = tuple(range(geometry.kv_groups[0])), tuple(range(geometry.intermediate_sizes[0]))
    layers = [
        LayerPlan(0, 1.0, {"gqa_group": groups, "mlp_channel": channels}),
        LayerPlan(1, 1.0, {"mlp_channel": channels}, ("attn_sublayer",)),
        LayerPlan(2, 1.0, {"gqa_group": groups[1:]}, ("mlp_sublayer",)),
        LayerPlan(3, 1.0, {}, ("layer",)),
        LayerPlan(4, 1.0, {"gqa_group": groups[::2], "mlp_channel": channels[::2]}),
    ]
    if removed_layer != 3:  # move the removed layer (e.g. to 0: the first remaining layer then lacks attention)
        layers[3], layers[removed_layer] = (
            LayerPlan(3, 1.0, {"gqa_group": groups, "mlp_channel": channels}),
            LayerPlan(removed_layer, 1.0, {}, ("layer",)),
        )
    settings = PlanSettings(ratio=0.5, mode="hybrid", channel_multiple=8)
    return PruningPlan(geometry, settings, tuple(layers), parameter_count(model))


def skipping_reference(model, plan):
    """A second reference, independent of surgery's masks: hooks scale removed contributions by 0."""
    geometry = geometry_of(model)
    removed = {layer.layer: layer.removed_units(geometry) for layer in plan.layers}
    return unit_masks(
        model, plan_adapter(model), geometry, removal_masks(geometry, {k: v for k, v in removed.items() if v})
    )


def plan_adapter(model):
    from gqa_prune.arch import adapter_for

    return adapter_for(model.config)


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
def test_removed_layers_and_sublayers_equal_references_that_skip_them(family, heads_per_group):
    model = tiny_model(family, heads_per_group, layers=5)
    plan = mixed_plan(model)
    masked = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert parameter_count(pruned) == plan.params_after < plan.params_before
    assert geometry_of(pruned) == plan.pruned_geometry() and len(pruned.model.layers) == 4
    assert pruned.config.num_hidden_layers == 4
    assert [layer.self_attn is None for layer in pruned.model.layers] == [False, True, False, False]
    assert [layer.mlp is None for layer in pruned.model.layers] == [False, False, True, False]
    with torch.no_grad(), skipping_reference(model, plan):
        hooked = model(INPUTS).logits
    for implementation in ("sdpa", "eager"):
        for each in (pruned, masked, model):
            each.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = pruned(INPUTS).logits
            assert (logits - masked(INPUTS).logits).abs().max().item() <= 1e-5
            assert (logits - hooked).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen3", 4), ("mistral", 1), ("qwen2", 3)])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("removed_layer", [3, 0])
def test_generate_with_kv_cache_on_every_mix(family, heads_per_group, implementation, removed_layer):
    model = tiny_model(family, heads_per_group, layers=5)
    plan = mixed_plan(model, removed_layer=removed_layer)
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    for each in (pruned, reference):
        each.set_attn_implementation(implementation)
    prompt = INPUTS[:1, :5]
    cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))
    assert torch.equal(cached, reference.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True))
    static = pruned.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(cached, static)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_checkpoint_with_removed_sublayers_reloads_identically(tmp_path, tiny_tokenizer, family):
    from test_checkpoint import _logits_in_fresh_process

    model = tiny_model(family, 3, layers=5, vocab_size=len(tiny_tokenizer))
    plan = mixed_plan(model, removed_layer=0)
    apply_plan(model, plan)
    with torch.no_grad():
        expected = model(INPUTS).logits
    folder = tmp_path / "pruned"
    save_pruned(model, tiny_tokenizer, plan, folder, source="org/tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["model_type"] == f"gqa_pruned_{family}"
    assert config["per_layer_config"]["0"]["skip"] == ["attention"] and config["per_layer_config"]["1"]["skip"] == [
        "mlp"
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(INPUTS).logits, expected)
    assert torch.equal(_logits_in_fresh_process(folder, tmp_path, INPUTS), expected)


def test_depth_only_plan_gives_a_stock_checkpoint(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", 3, layers=5, vocab_size=len(tiny_tokenizer))
    plan = build_plan(scores_for(model), PlanSettings(ratio=0.4, mode="depth"), parameter_count(model))
    assert plan.param_summary()["layers_removed"] == 2 and plan.is_uniform
    apply_plan(model, plan)
    with torch.no_grad():
        expected = model(INPUTS).logits
    save_pruned(model, tiny_tokenizer, plan, tmp_path / "depth", source="org/tiny")
    config = json.loads((tmp_path / "depth" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3 and "auto_map" not in config
    stock = LlamaForCausalLM.from_pretrained(tmp_path / "depth").eval()
    assert type(stock) is LlamaForCausalLM and parameter_count(stock) == plan.params_after
    with torch.no_grad():
        assert torch.equal(stock(INPUTS).logits, expected)


def test_depth_on_qwen2_cuts_layer_types_with_the_layers():
    model = tiny_model("qwen2", 3, layers=5)
    plan = build_plan(scores_for(model), PlanSettings(ratio=0.4, mode="depth"), parameter_count(model))
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(model, plan)
    assert len(pruned.config.layer_types) == pruned.config.num_hidden_layers == 3
    with torch.no_grad():
        assert (pruned(INPUTS).logits - reference(INPUTS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["width", "depth", "hybrid"])
@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen3", 4), ("qwen2", 1)])
def test_every_mode_predicts_its_parameter_count_and_matches_its_reference(mode, family, heads_per_group):
    model = tiny_model(family, heads_per_group, layers=5)
    settings = PlanSettings(ratio=0.3, mode=mode, channel_multiple=8)
    plan = build_plan(scores_for(model), settings, parameter_count(model))
    assert PruningPlan.from_json(plan.to_json()) == plan
    assert plan.param_summary()["achieved_ratio"] == pytest.approx(0.3, abs=0.12)
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert parameter_count(pruned) == plan.params_after
    with torch.no_grad():
        assert (pruned(INPUTS).logits - reference(INPUTS).logits).abs().max().item() <= 1e-5


def test_version_1_plans_still_load_and_apply():
    model = tiny_model("llama", 3, layers=4)
    plan = build_plan(scores_for(model), PlanSettings(0.5, 0.25, channel_multiple=8), parameter_count(model))
    data = plan.to_dict()
    data["version"] = 1
    data["settings"] = {key: value for key, value in data["settings"].items() if key not in ("ratio", "mode")}
    data["layers"] = [
        {"layer": layer.layer, "importance": layer.importance, "attn_rate": layer.attn_rate, "mlp_rate": layer.mlp_rate,
         "kept_kv_groups": list(layer.kept_kv_groups), "kept_mlp_channels": list(layer.kept_mlp_channels)}
        for layer in plan.layers
    ]  # fmt: skip
    for key in ("layers_removed", "attn_sublayers_removed", "mlp_sublayers_removed"):
        data["summary"].pop(key)
    old = PruningPlan.from_dict(data)
    assert [layer.kept for layer in old.layers] == [layer.kept for layer in plan.layers]
    with torch.no_grad():
        assert torch.equal(apply_plan(copy.deepcopy(model), old)(INPUTS).logits, apply_plan(model, plan)(INPUTS).logits)


def test_depth_plans_keep_protected_layers_and_at_least_one_layer():
    model = tiny_model("mistral", 3, layers=5)
    scores = scores_for(model)
    plan = build_plan(scores, PlanSettings(ratio=0.6, mode="depth", protected_layers=(0, 1)), parameter_count(model))
    assert [layer.layer for layer in plan.layers if layer.removes_layer] == [2, 3, 4]
    plan = build_plan(scores, PlanSettings(ratio=0.95, mode="depth"), parameter_count(model))
    assert plan.param_summary()["layers_removed"] == 4


def test_depth_removes_the_least_influential_layers(tiny_tokenizer):
    model = tiny_model("llama", 3, layers=5)
    with torch.no_grad():  # layers 1 and 3 add nothing to the residual stream: block influence 0
        for index in (1, 3):
            for projection in (model.model.layers[index].self_attn.o_proj, model.model.layers[index].mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
    plan = build_plan(scores_for(model), PlanSettings(ratio=0.4, mode="depth"), parameter_count(model))
    assert [layer.layer for layer in plan.layers if layer.removes_layer] == [1, 3]
    assert all(reason.basis == "block_influence" for layer in plan.layers for reason in layer.reasons)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(ratio=0.2, mode="depth", protected_layers=(0, 1, 2, 3, 4)), "mode depth cannot reach ratio 0.2"),
        (dict(ratio=0.2, mode="hybrid", protected_layers=(7,)), "protected layer 7 does not exist: the model has layers 0..4"),  # noqa: E501
        (dict(ratio=0.2, mode="hybrid", attn_ratio=0.1), "--attn-ratio/--mlp-ratio set a hand split and apply to --mode width only"),  # noqa: E501
        (dict(ratio=0.5, mode="hybrid", protected_layers=(0, 1, 2, 3)), "mode hybrid cannot reach ratio 0.5 under the limits"),  # noqa: E501
        (dict(ratio=0.2, mode="sideways"), "mode 'sideways' is not one of width, depth, hybrid"),
    ],
)  # fmt: skip
def test_bad_plan_requests_are_refused_in_one_line(settings, message):
    model = tiny_model("llama", 3, layers=5)
    with pytest.raises(GqaPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_plan(scores_for(model), PlanSettings(channel_multiple=8, **settings), parameter_count(model))


def test_a_plan_removing_every_layer_or_every_attention_is_refused():
    model = tiny_model("llama", 3, layers=3)
    geometry = geometry_of(model)
    settings = PlanSettings(ratio=0.5, mode="hybrid")
    with pytest.raises(GqaPruneError, match="the plan removes every attention sublayer"):
        PruningPlan(geometry, settings, tuple(LayerPlan(i, 1.0, {}, ("layer",)) for i in range(3)), 1)
    channels = {"mlp_channel": tuple(range(64))}
    with pytest.raises(GqaPruneError, match="the plan removes every attention sublayer"):
        PruningPlan(geometry, settings, tuple(LayerPlan(i, 1.0, channels, ("attn_sublayer",)) for i in range(3)), 1)


def test_a_depth_plan_for_another_depth_is_refused():
    plan = build_plan(scores_for(tiny_model("llama", 3, layers=5)), PlanSettings(ratio=0.4, mode="depth"), 1)
    with pytest.raises(GqaPruneError, match="plan does not fit this model: the plan is for 5 layers, the model has 4"):
        apply_plan(tiny_model("llama", 3, layers=4), plan)


def test_plans_record_what_went_and_why():
    model = tiny_model("qwen3", 3, layers=5)
    plan = build_plan(
        scores_for(model, layer_criteria=("removal",)), PlanSettings(ratio=0.4, mode="depth"), parameter_count(model)
    )
    reasons = [reason for layer in plan.layers for reason in layer.reasons]
    assert {reason.kind for reason in reasons} == {"layer"} and all(reason.basis == "removal" for reason in reasons)
    line = json.loads(plan.to_json())["layers"]
    assert any(entry["removed"] == ["layer"] and entry["reasons"][0]["kind"] == "layer" for entry in line)
