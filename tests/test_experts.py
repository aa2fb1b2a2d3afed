"""Expert pruning of mixture-of-experts models, on tiny seeded models of every supported MoE family: the
routing rule, pruned = masked reference, stock reload, the expert statistics against a direct computation,
and plans."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import DATA_DIR
from helpers import MOE_FAMILY_NAMES, calibration_ids, logits_in_fresh_process, parameter_count, tiny_moe
from test_cli import assert_one_line_error, run
from transformers import AutoModelForCausalLM

from gqa_prune import expert_scores
from gqa_prune.checkpoint import save_pruned
from gqa_prune.criteria.experts import EXPERT_CRITERIA
from gqa_prune.data import save_calibration
from gqa_prune.errors import GqaPruneError
from gqa_prune.expert_importance import score_experts
from gqa_prune.expert_plan import ExpertPlan, build_expert_plan, load_plan
from gqa_prune.expert_surgery import apply_expert_plan, masked_experts
from gqa_prune.moe import MOE_FAMILIES, expert_geometry_of, moe_family_for
from gqa_prune.passes import mean_loss
from gqa_prune.planning import top_units
from gqa_prune.scores import LossCurve
from gqa_prune.settings import ExpertPlanSettings


def _scores(model, blocks: int = 4, length: int = 16):
    return score_experts(copy.deepcopy(model), calibration_ids(blocks=blocks, length=length), batch_size=2)


def _plan(scores, ratio: float, criterion: str = "reap", **options) -> ExpertPlan:
    options.setdefault("channel_multiple", 1)
    return build_expert_plan(scores, ExpertPlanSettings(ratio, criterion, **options))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pruned_and_masked(model, plan: ExpertPlan, ids) -> tuple:
    """The physically pruned copy and the masked reference's logits, checked equal: the reference changes the
    outputs (else the test proves nothing) and restores the model after; parameters and geometry as planned."""
    dense = _logits(model, ids)
    with masked_experts(model, plan):
        masked = _logits(model, ids)
    assert (masked - dense).abs().max() > 1e-4, "the plan must change the outputs (else the test proves nothing)"
    torch.testing.assert_close(_logits(model, ids), dense)  # the reference hooks and zeroed columns are gone
    pruned = apply_expert_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(_logits(pruned, ids), masked, rtol=0, atol=1e-5)
    assert parameter_count(pruned) == plan.params_after
    assert expert_geometry_of(pruned) == plan.pruned_geometry()
    return pruned, masked


def test_every_supported_moe_family_has_a_tiny_model():
    assert set(MOE_FAMILY_NAMES) == set(MOE_FAMILIES)
    assert any(family.state_space for family in MOE_FAMILIES.values())


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_the_routing_rule_reproduces_the_stock_router(family):
    model = tiny_moe(family)
    moe = moe_family_for(model.config)
    block = next(moe.sparse_block(layer) for layer in moe.decoder_layers(model) if moe.sparse_block(layer))
    hidden = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, gates, indices = moe.router(block)(hidden)
    expected_gates, expected_indices = moe.routing(model.config).route(logits, model.config.num_experts_per_tok)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(gates.float(), expected_gates, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_pruned_equals_masked_reference_and_reloads_in_stock_transformers(family, tmp_path, tiny_tokenizer):
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    plan = _plan(_scores(model), 0.5)
    ids = calibration_ids(blocks=2, length=12, seed=3)
    pruned, masked = _pruned_and_masked(model, plan, ids)

    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in config and not list((tmp_path / "pruned").glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # no trust_remote_code
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)
    assert isinstance(load_plan(tmp_path / "pruned" / "pruning_plan.json"), ExpertPlan)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_the_expert_layout_reproduces_each_experts_output(family):
    """What channel pruning and channel scores rely on: activations and down columns read from the fused
    tensors give exactly the experts module's own output for one expert at gate 1."""
    model = tiny_moe(family)
    moe = moe_family_for(model.config)
    block = next(moe.sparse_block(layer) for layer in moe.decoder_layers(model) if moe.sparse_block(layer))
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for expert in range(block.experts.gate_up_proj.shape[0]):
            own = block.experts.forward(x, torch.full((7, 1), expert), torch.ones(7, 1))
            layout = moe.layout.output(block.experts, expert, moe.layout.activation(block.experts, expert, x))
            torch.testing.assert_close(layout, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_per_layer_counts_and_expert_channels_equal_their_masked_reference_and_reload(family, tmp_path, tiny_tokenizer):
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    scores = _scores(model)
    plan = _plan(scores, 1 / 3, allocation="per-layer", channel_ratio=0.25, channel_multiple=8)
    assert plan.channels is not None
    ids = calibration_ids(blocks=2, length=12, seed=4)
    with masked_experts(model, plan):
        masked = _logits(model, ids)
    pruned = apply_expert_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(_logits(pruned, ids), masked, rtol=0, atol=1e-5)
    assert parameter_count(pruned) == plan.params_after
    assert expert_geometry_of(pruned).widths == plan.pruned_geometry().widths

    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    if plan.is_uniform:  # per-layer ranking happened to keep one count: still a stock checkpoint
        assert "auto_map" not in config
    else:
        assert config["model_type"] == f"gqa_pruned_{family}" and config["per_layer_config"]
        assert (tmp_path / "pruned" / "modeling_gqa_prune.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # classes of `import gqa_prune`
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)


def test_per_layer_allocations_take_more_experts_from_the_layer_whose_experts_matter_less():
    """Measured loss curves (per-layer) and the criterion's ranking (ranked) both see that layer 1's experts
    add 100 times less: it gives all it can (it keeps top-k = 2), the others the rest."""
    model = tiny_moe("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(0.01)
    scores = _scores(model)
    assert sorted(scores.curves) == [0, 1, 2]
    assert all(scores.curves[1].loss(p) < scores.curves[0].loss(p) for p, _ in scores.curves[0].points[:2])
    uniform = _plan(scores, 1 / 3)
    assert [len(kept) for kept in uniform.kept] == [4, 4, 4]
    for allocation in ("per-layer", "ranked"):
        plan = _plan(scores, 1 / 3, allocation=allocation)
        counts = [len(kept) for kept in plan.kept]
        assert counts[1] == 2 and sum(counts) == 12, allocation  # 6 of 18 go
        assert plan.params_after == uniform.params_after


def test_expert_loss_curves_are_what_removing_a_layers_experts_alone_costs():
    """A curve point = the calibration loss with that layer's lowest-REAP experts masked out of routing, minus
    the dense loss (measured independently through an expert plan's masked reference)."""
    model = tiny_moe("qwen3_moe")
    blocks = calibration_ids(blocks=4, length=16)
    scores = score_experts(copy.deepcopy(model), blocks, batch_size=2)
    base = mean_loss(model, list(blocks.split(2)), torch.device("cpu"))
    reap = [EXPERT_CRITERIA["reap"].scores(scores.layer_stats(layer), layer, 0) for layer in range(3)]
    for layer, curve in scores.curves.items():
        assert [params // scores.geometry.params_per_expert(layer) for params, _ in curve.points] == [2, 3, 4]
        removed, increase = 3, curve.points[1][1]
        kept = tuple(top_units(reap[i], 6 - removed) if i == layer else tuple(range(6)) for i in range(3))
        with masked_experts(
            model, ExpertPlan(scores.geometry, 0.5, "reap", kept, scores.info["parameters"], allocation="ranked")
        ):
            measured = mean_loss(model, list(blocks.split(2)), torch.device("cpu")) - base
        assert increase == pytest.approx(measured, abs=1e-6)
    no_curves = score_experts(copy.deepcopy(model), blocks, batch_size=2, curves=False)
    with pytest.raises(GqaPruneError, match="--experts per-layer prices layers by measured loss curves"):
        _plan(no_curves, 0.25, allocation="per-layer")


def _direct_statistics(model) -> dict[str, list[torch.Tensor]]:
    """The four statistics computed by hand from routed tokens: the router and each expert's SwiGLU MLP
    evaluated from the weights themselves (Mixtral layout), not through the experts module."""
    moe = moe_family_for(model.config)
    layers = moe.decoder_layers(model)
    inputs = {}
    handles = [
        moe.sparse_block(layer).register_forward_hook(
            lambda module, args, output, index=index: inputs.setdefault(index, []).append(args[0].detach())
        )
        for index, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in calibration_ids(blocks=4, length=16).split(2):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    top_k = model.config.num_experts_per_tok
    statistics = {name: [] for name in ("count", "gate_sum", "norm_sum", "gate_norm_sum")}
    for index, layer in enumerate(layers):
        block = moe.sparse_block(layer)
        hidden = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[index]]).double()
        router, experts = moe.router(block).weight.double(), block.experts
        probabilities = torch.softmax(hidden @ router.T, dim=-1)
        gates, chosen = torch.topk(probabilities, top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        count, gate_sum, norm_sum, gate_norm_sum = (torch.zeros(router.shape[0], dtype=torch.float64) for _ in range(4))
        for token in range(len(hidden)):
            for slot in range(top_k):
                expert = int(chosen[token, slot])
                gate, up = (experts.gate_up_proj[expert].double() @ hidden[token]).chunk(2)
                output = experts.down_proj[expert].double() @ (torch.nn.functional.silu(gate) * up)
                norm, weight = output.norm(), gates[token, slot]
                count[expert] += 1
                gate_sum[expert] += weight
                norm_sum[expert] += norm
                gate_norm_sum[expert] += weight * norm
        for name, value in zip(statistics, (count, gate_sum, norm_sum, gate_norm_sum)):
            statistics[name].append(value)
    return statistics


def test_reap_statistics_match_a_direct_computation_from_routed_tokens():
    model = tiny_moe("mixtral")
    scores = _scores(model)
    direct = _direct_statistics(model)
    for name, per_layer in direct.items():
        for layer, expected in enumerate(per_layer):
            torch.testing.assert_close(scores.stats[name][layer], expected, rtol=1e-4, atol=1e-4)
    reap = EXPERT_CRITERIA["reap"].scores(scores.layer_stats(0), 0, 0)
    torch.testing.assert_close(reap, direct["gate_norm_sum"][0] / direct["count"][0].clamp(min=1), rtol=1e-4, atol=1e-4)


def test_an_expert_never_routed_to_scores_lowest_under_every_criterion():
    model = tiny_moe("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[4] = -1e4  # expert 4 never wins a top-k slot
    scores = _scores(model)
    for layer in scores.geometry.moe_layers:
        assert scores.stats["count"][layer][4] == 0
        for name in ("reap", "frequency", "gate", "ean"):
            layer_scores = EXPERT_CRITERIA[name].scores(scores.layer_stats(layer), layer, 0)
            assert layer_scores[4] == 0 and (layer_scores[torch.arange(6) != 4] > 0).all(), name
    plan = _plan(scores, 1 / 6)
    assert all(4 not in kept and len(kept) == 5 for kept in plan.kept)


def test_a_planted_useless_expert_is_removed_first_by_reap_but_not_by_frequency():
    model = tiny_moe("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[2].zero_()  # routed to as often as before, but adds nothing
    scores = _scores(model)
    assert all(scores.stats["count"][layer][2] > 0 for layer in range(3))
    reap = _plan(scores, 1 / 6, "reap")
    assert all(kept == (0, 1, 3, 4, 5) for kept in reap.kept)
    frequency = _plan(scores, 1 / 6, "frequency")
    assert any(2 in kept for kept in frequency.kept)


def test_a_dense_layer_between_moe_layers_keeps_no_expert_list():
    model = tiny_moe("qwen2_moe")  # mlp_only_layers=[1]
    scores = _scores(model)
    assert scores.geometry.experts == (6, 0, 6)
    plan = _plan(scores, 0.5)
    assert plan.kept[1] == () and len(plan.kept[0]) == len(plan.kept[2]) == 3


def test_a_plan_that_removes_no_expert_and_no_group_changes_nothing():
    model = tiny_moe("qwen3_moe")
    scores = _scores(model)
    ids = calibration_ids(blocks=2, length=12, seed=5)
    for plan in (_plan(scores, 0.0), _plan(scores, 0.0, width_ratio=0.2)):  # 0.2 of 2 groups rounds to none
        pruned = apply_expert_plan(copy.deepcopy(model), plan)
        assert torch.equal(_logits(pruned, ids), _logits(model, ids))
    assert plan.groups == ((0, 1),) * 3


GROUP_FAMILIES = [family for family in MOE_FAMILY_NAMES if not MOE_FAMILIES[family].heads_normed_together]


@pytest.mark.parametrize("family", GROUP_FAMILIES)
def test_gqa_groups_and_shared_channels_equal_their_masked_reference_and_reload_in_stock_transformers(
    family, tmp_path, tiny_tokenizer
):
    """--ratio on a MoE: every attention layer loses the same share of GQA groups and every shared MLP of its
    channels (state-space layers keep everything), alone and together with experts; the checkpoint stays
    stock."""
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    scores = _scores(model)
    ids = calibration_ids(blocks=2, length=12, seed=6)
    for expert_ratio in (0.0, 0.5):
        plan = _plan(scores, expert_ratio, width_ratio=0.5)
        assert [len(kept) for kept in plan.groups] == [1 if groups else 0 for groups in scores.geometry.kv_groups]
        shared = MOE_FAMILIES[family].shared_mlp
        if shared is None:
            assert plan.shared_channels is None
        else:  # Qwen2-MoE's shared expert (not in its dense layer 1), Granite's shared MLP: 20 channels -> 10
            assert [len(kept) for kept in plan.shared_channels] == [w // 2 for w in scores.geometry.shared_widths]
        pruned, masked = _pruned_and_masked(model, plan, ids)
    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in config and config["num_key_value_heads"] == 1 and config["head_dim"] == 8
    if MOE_FAMILIES[family].shared_mlp is not None:
        assert config[MOE_FAMILIES[family].shared_mlp.width_key] == 10
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # no trust_remote_code
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)
    assert load_plan(tmp_path / "pruned" / "pruning_plan.json") == plan


def test_group_statistics_equal_each_groups_own_output_norms():
    """The group statistic of a layer = what o_proj writes with every other group's columns and the bias
    zeroed, normed per token and summed (the layer's inputs do not depend on its own o_proj)."""
    model = tiny_moe("gpt_oss")  # o_proj has a bias
    scores = _scores(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    width = scores.geometry.heads_per_group * scores.geometry.head_dim
    for group in range(scores.geometry.kv_groups[0]):
        alone = copy.deepcopy(model)
        own = alone.model.layers[0].self_attn.o_proj
        with torch.no_grad():
            own.weight.zero_()
            own.weight[:, group * width : (group + 1) * width] = o_proj.weight[:, group * width : (group + 1) * width]
            own.bias.zero_()
        written = []
        own.register_forward_hook(lambda module, args, output: written.append(output.double().norm(dim=-1).sum()))
        with torch.no_grad():
            for batch in calibration_ids(blocks=4, length=16).split(2):
                alone(input_ids=batch)
        torch.testing.assert_close(scores.stats["group"][0][group], torch.stack(written).sum(), rtol=1e-4, atol=1e-4)


def test_planted_silent_shared_channels_are_removed_first():
    model = tiny_moe("qwen2_moe")
    with torch.no_grad():
        for index in (0, 2):
            model.model.layers[index].mlp.shared_expert.down_proj.weight[:, 10:].zero_()  # channels 10-19 add nothing
    scores = _scores(model)
    plan = _plan(scores, 0.0, width_ratio=0.5)
    assert plan.shared_channels == (tuple(range(10)), (), tuple(range(10)))
    assert all((scores.stats["shared"][layer][10:] == 0).all() for layer in (0, 2))


def test_a_planted_silent_group_is_removed_first_and_olmoe_groups_are_refused():
    model = tiny_moe("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :16].zero_()  # group 0: its 2 query heads of head_dim 8 write nothing
    scores = _scores(model)
    assert all(scores.stats["group"][layer][0] == 0 for layer in range(3))
    assert _plan(scores, 0.0, width_ratio=0.5).groups == ((1,), (1,), (1,))
    with pytest.raises(GqaPruneError, match="olmoe normalises q and k across all heads together"):
        _plan(_scores(tiny_moe("olmoe")), 0.25, width_ratio=0.5)


def _scored_with_dense_loss(family: str) -> tuple:
    """A tiny model of ``family``, 4 calibration blocks, its expert scores (with every loss curve) and its dense
    calibration loss on those blocks in batches of 2, as the curves measure it."""
    model = tiny_moe(family)
    blocks = calibration_ids(blocks=4, length=16)
    scores = score_experts(copy.deepcopy(model), blocks, batch_size=2)
    return model, blocks, scores, mean_loss(model, list(blocks.split(2)), torch.device("cpu"))


def test_width_loss_curves_are_what_removing_a_layers_groups_or_shared_channels_alone_costs():
    """A group / shared-channel curve point = the calibration loss of the model with that layer's lowest-scored
    groups / channels physically removed (nothing else), minus the dense loss."""
    model, blocks, scores, base = _scored_with_dense_loss("qwen2_moe")
    geometry, cpu = scores.geometry, torch.device("cpu")
    every = tuple(tuple(range(count)) for count in geometry.experts)
    kinds = {
        "group": ("groups", geometry.kv_groups, geometry.params_per_group, [1]),  # 2 groups: one must stay
        "shared": ("shared_channels", geometry.shared_widths, geometry.params_per_shared_channel, [5, 10, 15]),
    }
    for kind, (field_name, sizes, unit_params, counts) in kinds.items():
        assert sorted(scores.width_curves[kind]) == [layer for layer, size in enumerate(sizes) if size]
        for layer, curve in scores.width_curves[kind].items():
            assert [params // unit_params for params, _ in curve.points] == counts
            removed, increase = counts[-1], curve.points[-1][1]
            kept = [tuple(range(size)) for size in sizes]
            kept[layer] = top_units(scores.stats[kind][layer], sizes[layer] - removed)
            plan = ExpertPlan(
                geometry, 0.0, "reap", every, scores.info["parameters"], allocation="per-layer",
                **{field_name: tuple(kept)},
            )  # fmt: skip
            pruned = apply_expert_plan(copy.deepcopy(model), plan)
            assert increase == pytest.approx(mean_loss(pruned, list(blocks.split(2)), cpu) - base, abs=1e-5)
    assert sorted(scores.width_curves["channel"]) == list(geometry.moe_layers)  # every expert's channels at once
    for layer, curve in scores.width_curves["channel"].items():
        per_channel = geometry.experts[layer] * geometry.params_per_channel
        assert [params // per_channel for params, _ in curve.points] == [4, 8, 12]  # of 16 per expert
        channels = [tuple(tuple(range(width)) for _ in kept) for width, kept in zip(geometry.widths, every)]
        channels[layer] = tuple(top_units(stat, 4) for stat in scores.stats["channel"][layer])  # 12 removed
        plan = ExpertPlan(geometry, 0.0, "reap", every, scores.info["parameters"], allocation="per-layer",
                          channels=tuple(channels))  # fmt: skip
        pruned = apply_expert_plan(copy.deepcopy(model), plan)
        assert curve.points[-1][1] == pytest.approx(mean_loss(pruned, list(blocks.split(2)), cpu) - base, abs=1e-5)


def test_per_layer_plans_price_expert_channels_against_experts_counting_their_overlap():
    """--experts per-layer with --expert-channel-ratio: expert channels compete per layer too (a step: one
    --channel-multiple of channels from every expert of the layer). Hand-set curves: layer 2's channels are
    nearly free up to half, its experts and layer 0's channels dear, layer 0's experts cheap. Experts and
    channels going from the same layer would count the removed experts' channels twice; the plan raises its
    target by that overlap, so it removes what the ratios name within half a step."""
    scores = _scores(tiny_moe("qwen2_moe"))
    geometry = scores.geometry
    expert, per_channel = geometry.params_per_expert(0), 6 * geometry.params_per_channel  # a channel of 6 experts
    scores.curves = {
        layer: LossCurve(tuple((n * expert, n * nats) for n in (2, 3, 4))) for layer, nats in ((0, 0.1), (2, 5.0))
    }
    scores.width_curves["channel"] = {
        0: LossCurve(((4 * per_channel, 8.0), (8 * per_channel, 16.0))),
        2: LossCurve(((4 * per_channel, 0.01), (8 * per_channel, 0.02), (12 * per_channel, 9.0))),
    }
    plan = _plan(scores, 0.25, allocation="per-layer", channel_ratio=0.25, channel_multiple=4)
    # 0.25 x 18,816 expert + 0.25 x 18,432 channel parameters = 9,312: layer 2's 8 cheap channels of every expert
    # (4,608), then layer 0's experts (1,568 each) while at least half a step remains
    assert [len(kept) for kept in plan.kept] == [3, 0, 6]
    assert [plan.kept_width(layer) for layer in (0, 2)] == [16, 8] and not plan.is_uniform
    assert plan.params_before - plan.params_after == 8 * per_channel + 3 * expert
    scores.curves[2] = LossCurve(tuple((n * expert, n * 0.001) for n in (2, 3, 4)))  # layer 2's experts now free
    plan = _plan(scores, 0.25, allocation="per-layer", channel_ratio=0.25, channel_multiple=4)
    removed_experts, width = 6 - len(plan.kept[2]), plan.kept_width(2)
    assert removed_experts and width < 16  # both from layer 2: its channels are counted once, in kept experts
    assert abs(plan.params_before - plan.params_after - 9312) <= expert / 2
    with pytest.raises(GqaPruneError, match=r"experts of 16 channels cannot lose channels in multiples of 16 \("):
        _plan(scores, 0.25, allocation="per-layer", channel_ratio=0.25, channel_multiple=16)
    del scores.width_curves["channel"]
    with pytest.raises(GqaPruneError, match="--experts per-layer prices expert channels by measured loss curves"):
        _plan(scores, 0.25, allocation="per-layer", channel_ratio=0.25, channel_multiple=4)


def test_per_layer_plans_price_gqa_groups_and_shared_channels_against_experts():
    """--experts per-layer with --ratio: what the ratios remove is split among experts, GQA groups and
    shared-MLP channels of every layer by their loss curves, cheapest per parameter first. Curves set by hand
    (a tiny random model's are noise): layer 1's group and half of layer 0's shared channels are nearly free,
    layer 2's experts cost half of layer 0's, the other groups and shared channels are dear."""
    scores = _scores(tiny_moe("qwen2_moe"))
    geometry = scores.geometry
    expert, group, channel = (
        geometry.params_per_expert(0),
        geometry.params_per_group,
        geometry.params_per_shared_channel,
    )
    scores.curves = {
        layer: LossCurve(tuple((n * expert, n * nats) for n in (2, 3, 4))) for layer, nats in ((0, 1.0), (2, 0.5))
    }
    scores.width_curves = {
        "group": {0: LossCurve(((group, 5.0),)), 1: LossCurve(((group, 0.01),)), 2: LossCurve(((group, 5.0),))},
        "shared": {
            0: LossCurve(((5 * channel, 0.05), (10 * channel, 0.1), (15 * channel, 3.0))),
            2: LossCurve(((5 * channel, 2.0), (10 * channel, 4.0), (15 * channel, 6.0))),
        },
    }
    plan = _plan(scores, 0.25, allocation="per-layer", width_ratio=0.2)
    # 0.25 x 18,816 expert + 0.2 x 13,248 group and shared parameters = 7,353.6: layer 1's group (1,568) and
    # 10 shared channels of layer 0 (960), then layer 2's three cheaper experts (4,704); of the 121.6 left one
    # channel (96) of layer 2's shared MLP, the cheapest step that is at most half over
    assert [len(kept) for kept in plan.groups] == [2, 1, 2]
    assert [len(kept) for kept in plan.shared_channels] == [10, 0, 19]
    assert [len(kept) for kept in plan.kept] == [6, 0, 3]
    assert plan.params_before - plan.params_after == group + 11 * channel + 3 * expert
    assert not plan.is_uniform
    scores.width_curves = {}
    with pytest.raises(
        GqaPruneError, match="--experts per-layer prices GQA groups by measured loss curves; these scores lack them"
    ):
        _plan(scores, 0.25, allocation="per-layer", width_ratio=0.2)


@pytest.mark.parametrize("family", GROUP_FAMILIES)
def test_per_layer_group_counts_and_shared_widths_equal_their_masked_reference_and_reload(
    family, tmp_path, tiny_tokenizer
):
    """A plan keeping one GQA group in the first attention layer and both elsewhere, half the channels of the
    first shared MLP and two experts fewer in the first MoE layer: the pruned model equals its masked reference
    and reloads through the project's model class, in every family whose groups can be removed."""
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    geometry = expert_geometry_of(model)
    first_attention, first_moe = geometry.attention_layers[0], geometry.moe_layers[0]
    kept = tuple(
        tuple(range(count - 2 if layer == first_moe else count)) for layer, count in enumerate(geometry.experts)
    )
    groups = tuple(
        (1,) if layer == first_attention else tuple(range(count)) for layer, count in enumerate(geometry.kv_groups)
    )
    shared = None
    if MOE_FAMILIES[family].shared_mlp is not None:
        first_shared = next(layer for layer, width in enumerate(geometry.shared_widths) if width)
        shared = tuple(
            tuple(range(0, width, 2)) if layer == first_shared else tuple(range(width))
            for layer, width in enumerate(geometry.shared_widths)
        )
    plan = ExpertPlan(
        geometry, 0.0, "reap", kept, parameter_count(model), allocation="per-layer", groups=groups,
        shared_channels=shared,
    )  # fmt: skip
    ids = calibration_ids(blocks=2, length=12, seed=8)
    pruned, masked = _pruned_and_masked(model, plan, ids)
    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == f"gqa_pruned_{family}" and (tmp_path / "pruned" / "modeling_gqa_prune.py").is_file()
    layer_entry = config["per_layer_config"].get(str(first_attention), {})  # Granite: one attention layer, global
    assert layer_entry.get("num_attention_heads", config["num_attention_heads"]) == geometry.heads_per_group
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # classes of `import gqa_prune`
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)
    assert expert_geometry_of(reloaded) == plan.pruned_geometry()


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_a_removed_layer_equals_its_bypassed_reference_and_reloads_in_stock_transformers(
    family, tmp_path, tiny_tokenizer
):
    """Layer 0 removed whole (a Mamba layer in Granite; before Qwen2-MoE's dense layer, which becomes layer 0)
    and two experts of every remaining MoE layer: the pruned model equals the dense one with layer 0 passing its
    input on, reloads with no remote code (layer_types, mlp_only_layers renumbered), and decodes with its KV
    cache as it runs whole sequences (the caches' layer indices follow the new numbering)."""
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    geometry = expert_geometry_of(model)
    kept = tuple(
        tuple(range(count if layer == 0 or not count else count - 2)) for layer, count in enumerate(geometry.experts)
    )
    plan = ExpertPlan(
        geometry, 1 / 3, "reap", kept, parameter_count(model), allocation="per-layer", removed_layers=(0,)
    )
    ids = calibration_ids(blocks=2, length=12, seed=9)
    pruned, masked = _pruned_and_masked(model, plan, ids)
    assert len(pruned.model.layers) == 2 and plan.summary()["layers_after"] == 2
    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in config and config["num_hidden_layers"] == 2
    assert load_plan(tmp_path / "pruned" / "pruning_plan.json") == plan
    if "layer_types" in model.config.to_dict() and model.config.layer_types is not None:
        assert config["layer_types"] == list(model.config.layer_types[1:])
    if family == "qwen2_moe":
        assert config["mlp_only_layers"] == [0]  # the dense layer 1 is now layer 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # no trust_remote_code
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)
    with torch.no_grad():
        prefix = reloaded(input_ids=ids[:, :-1], use_cache=True)
        step = reloaded(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], masked[:, -1], rtol=0, atol=1e-4)


# families whose layers share one attention type: a single attention block can go (gpt-oss alternates sliding
# and full attention, Granite attention and Mamba layers: they lose MoE blocks or whole layers only)
SUBLAYER_ATTENTION_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_removed_sublayers_equal_their_silenced_reference_and_reload_through_the_projects_class(
    family, tmp_path, tiny_tokenizer
):
    """Layer 0's MoE block (routed experts, shared expert or shared MLP, and its norm) removed, and, where the
    attention types allow, layer 2's attention block, plus two experts of layer 2: the pruned model equals the
    dense one with those blocks adding nothing, reloads through the project's class (per_layer_config "skip")
    and decodes with its KV cache as it runs whole sequences (attention blocks renumbered)."""
    model = tiny_moe(family, vocab_size=len(tiny_tokenizer))
    geometry = expert_geometry_of(model)
    kept = tuple(tuple(range(count - 2 if layer == 2 else count)) for layer, count in enumerate(geometry.experts))
    removed = ((0, "mlp"), (2, "attention")) if family in SUBLAYER_ATTENTION_FAMILIES else ((0, "mlp"),)
    plan = ExpertPlan(
        geometry, 0.0, "reap", kept, parameter_count(model), allocation="per-layer", removed_sublayers=removed
    )
    assert plan.params_before - plan.params_after == sum(
        geometry.sublayer_params[layer][("attention", "mlp").index(name)] for layer, name in removed
    ) + 2 * geometry.params_per_expert(2)
    ids = calibration_ids(blocks=2, length=12, seed=10)
    pruned, masked = _pruned_and_masked(model, plan, ids)
    assert pruned.model.layers[0].post_attention_layernorm is None and not plan.is_uniform
    save_pruned(pruned, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny-moe")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == f"gqa_pruned_{family}" and config["per_layer_config"]["0"]["skip"] == ["mlp"]
    assert load_plan(tmp_path / "pruned" / "pruning_plan.json") == plan
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # the classes of `import gqa_prune`
    torch.testing.assert_close(_logits(reloaded, ids), masked, rtol=0, atol=1e-5)
    assert expert_geometry_of(reloaded) == plan.pruned_geometry()
    with torch.no_grad():
        prefix = reloaded(input_ids=ids[:, :-1], use_cache=True)
        step = reloaded(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], masked[:, -1], rtol=0, atol=1e-4)
    shipped, module, _ = logits_in_fresh_process(  # the modeling file beside the weights, without gqa_prune
        tmp_path, ids, f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'pruned')!r}, "
        "trust_remote_code=True).eval()",
    )  # fmt: skip
    assert "modeling_gqa_prune" in module
    torch.testing.assert_close(shipped, masked, rtol=0, atol=1e-5)


def test_removed_sublayers_are_refused_where_they_cannot_go():
    """One line each: an attention block of a model mixing attention types, a Mamba layer's attention, both
    blocks of a layer, every MoE block, a sublayer of a removed layer, units of a removed block not listed whole,
    geometry without sublayer sizes."""
    model = tiny_moe("gpt_oss")
    geometry = expert_geometry_of(model)
    every = tuple(tuple(range(count)) for count in geometry.experts)
    plan = ExpertPlan(geometry, 0.0, "reap", every, parameter_count(model), allocation="per-layer")
    with pytest.raises(GqaPruneError, match=r"mixes attention types .* \(remove whole layers instead: --whole-layers"):
        apply_expert_plan(copy.deepcopy(model), replace(plan, removed_sublayers=((1, "attention"),)))
    refusals = {
        ((0, "attention"), (0, "mlp")): "name both sublayers of a layer; remove the layer instead",
        ((0, "mlp"), (1, "mlp"), (2, "mlp")): "removes every MoE block; at least one must stay",
        ((0, "norm"),): r"removed sublayer \(0, 'norm'\): give a layer in 0..2 and one of attention, mlp",
        ((1, "mlp"), (0, "mlp")): "must be sorted, unique",
    }
    for removed, message in refusals.items():
        with pytest.raises(GqaPruneError, match=message):
            replace(plan, removed_sublayers=removed)
    with pytest.raises(GqaPruneError, match="layer 1 is removed whole; it cannot also lose its mlp sublayer"):
        replace(plan, removed_layers=(1,), removed_sublayers=((1, "mlp"),))
    fewer = tuple(tuple(range(count - 1 if layer == 0 else count)) for layer, count in enumerate(geometry.experts))
    with pytest.raises(GqaPruneError, match="layer 0 loses its mlp sublayer; its units must all be listed as kept"):
        replace(plan, kept=fewer, removed_sublayers=((0, "mlp"),))
    with pytest.raises(GqaPruneError, match="records no sublayer sizes"):
        replace(plan, geometry=replace(geometry, sublayer_params=()), removed_sublayers=((0, "mlp"),))
    hybrid = tiny_moe("granitemoehybrid")
    hybrid_geometry = expert_geometry_of(hybrid)
    every = tuple(tuple(range(count)) for count in hybrid_geometry.experts)
    with pytest.raises(GqaPruneError, match="layer 0 has no attention sublayer to remove"):
        ExpertPlan(hybrid_geometry, 0.0, "reap", every, parameter_count(hybrid), allocation="per-layer",
                   removed_sublayers=((0, "attention"),))  # fmt: skip


def test_layer_loss_curves_are_what_removing_each_layer_costs_and_cheap_layers_go_whole():
    """A layer's curve point = its parameters and the calibration loss of the model without it, minus the dense
    loss. With --whole-layers a layer whose removal costs less per parameter than its units goes whole."""
    model, blocks, scores, base = _scored_with_dense_loss("mixtral")
    geometry, cpu = scores.geometry, torch.device("cpu")
    every = tuple(tuple(range(count)) for count in geometry.experts)
    for layer, curve in scores.width_curves["layer"].items():
        plan = ExpertPlan(geometry, 0.0, "reap", every, scores.info["parameters"], allocation="per-layer",
                          removed_layers=(layer,))  # fmt: skip
        pruned = apply_expert_plan(copy.deepcopy(model), plan)
        assert curve.points[0][0] == geometry.layer_params[layer] == plan.params_before - plan.params_after
        assert curve.points[0][1] == pytest.approx(mean_loss(pruned, list(blocks.split(2)), cpu) - base, abs=1e-5)
    scores.curves = {
        layer: LossCurve(tuple((n * geometry.params_per_expert(layer), 1.0 * n) for n in (2, 3, 4)))
        for layer in range(3)
    }
    scores.width_curves["layer"] = {
        layer: LossCurve(((geometry.layer_params[layer], 5.0 if layer != 1 else 0.01),)) for layer in range(3)
    }
    del scores.width_curves["attention"], scores.width_curves["mlp"]  # the layers alone compete with experts
    plan = _plan(scores, 0.25, allocation="per-layer", whole_layers=True)
    assert plan.removed_layers == (1,) and plan.kept[1] == tuple(range(6))
    assert _plan(scores, 0.25, allocation="per-layer").removed_layers == ()
    with pytest.raises(
        GqaPruneError,
        match="--whole-layers prices layers against experts by measured loss curves: it needs --experts per-layer",
    ):
        _plan(scores, 0.25, whole_layers=True)


def test_sublayer_loss_curves_are_what_removing_each_block_costs_and_cheap_blocks_go():
    """A sublayer's curve point = its parameters and the calibration loss of the model without that attention or
    MoE block (physically removed), minus the dense loss; Qwen2-MoE's dense layer 1 has no MoE block to measure.
    With --whole-layers a block cheaper per parameter than its units goes alone; both blocks of one layer going
    make that layer a removed layer."""
    model, blocks, scores, base = _scored_with_dense_loss("qwen2_moe")
    geometry, cpu = scores.geometry, torch.device("cpu")
    assert sorted(scores.width_curves["mlp"]) == [0, 2] and sorted(scores.width_curves["attention"]) == [0, 1, 2]
    every = tuple(tuple(range(count)) for count in geometry.experts)
    for index, name in enumerate(("attention", "mlp")):
        for layer, curve in scores.width_curves[name].items():
            plan = ExpertPlan(geometry, 0.0, "reap", every, scores.info["parameters"], allocation="per-layer",
                              removed_sublayers=((layer, name),))  # fmt: skip
            pruned = apply_expert_plan(copy.deepcopy(model), plan)
            assert (
                curve.points[0][0] == geometry.sublayer_params[layer][index] == plan.params_before - plan.params_after
            )
            assert curve.points[0][1] == pytest.approx(mean_loss(pruned, list(blocks.split(2)), cpu) - base, abs=1e-5)
    expensive = {layer: LossCurve(((size, 50.0),)) for layer, size in enumerate(geometry.layer_params)}
    scores.curves = {
        layer: LossCurve(tuple((n * geometry.params_per_expert(layer), 1.0 * n) for n in (2, 3, 4)))
        for layer in geometry.moe_layers
    }
    scores.width_curves["layer"] = expensive
    scores.width_curves["mlp"] = {layer: LossCurve(((geometry.sublayer_params[layer][1], 9.0),)) for layer in (0, 2)}
    scores.width_curves["mlp"][2] = LossCurve(((geometry.sublayer_params[2][1], 0.01),))
    scores.width_curves["attention"] = {
        layer: LossCurve(((geometry.sublayer_params[layer][0], 0.01 if layer == 1 else 9.0),)) for layer in range(3)
    }
    plan = _plan(scores, 0.75, allocation="per-layer", whole_layers=True)  # layer 2's MoE block, then attention 1
    assert plan.removed_sublayers == ((1, "attention"), (2, "mlp")) and plan.removed_layers == ()
    assert plan.kept[2] == tuple(range(6)) and plan.summary()["sublayers_removed"] == 2
    scores.width_curves["attention"][2] = LossCurve(((geometry.sublayer_params[2][0], 0.005),))
    plan = _plan(scores, 0.75, allocation="per-layer", whole_layers=True)  # then attention 2 instead
    assert plan.removed_layers == (2,) and plan.removed_sublayers == ()
    assert _plan(scores, 0.5, allocation="per-layer").removed_sublayers == ()


def test_expert_plans_round_trip_through_json_and_refuse_fewer_experts_than_top_k(tmp_path):
    scores = _scores(tiny_moe("olmoe"))
    plan = _plan(scores, 1 / 3, "ean")
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    with pytest.raises(GqaPruneError, match="keeps 1 of layer 0's 6 experts, fewer than the 2"):
        _plan(scores, 0.8)
    with pytest.raises(GqaPruneError, match="fewer than the 2 experts every token is routed to"):
        ExpertPlan(plan.geometry, 0.9, "reap", ((1,), (2,), (3,)), plan.params_before)
    with_channels = _plan(scores, 0.5, "reap", allocation="per-layer", channel_ratio=0.5, channel_multiple=4)
    with_channels.save(tmp_path / "channels.json")
    assert load_plan(tmp_path / "channels.json") == with_channels
    with pytest.raises(GqaPruneError, match="every expert of a layer keeps the same number of channels"):
        channels = list(with_channels.channels)
        channels[0] = ((0, 1),) + channels[0][1:]
        replace(with_channels, channels=tuple(channels))
    whole = replace(plan, kept=tuple(tuple(range(6)) for _ in range(3)), allocation="per-layer")
    with pytest.raises(GqaPruneError, match="layer 1 is removed whole; its units must all be listed as kept"):
        replace(plan, allocation="per-layer", removed_layers=(1,))
    with pytest.raises(GqaPruneError, match="plan removes every layer with experts; at least one must stay"):
        replace(whole, removed_layers=(0, 1, 2))
    with pytest.raises(GqaPruneError, match=r"removed layers must be sorted, unique indices in 0..2"):
        replace(whole, removed_layers=(3,))
    older = replace(whole, geometry=replace(whole.geometry, layer_params=()))
    with pytest.raises(GqaPruneError, match="plan removes layers but its geometry records no layer sizes"):
        replace(older, removed_layers=(1,))


def test_expert_scores_round_trip_through_their_folder(tmp_path, tiny_tokenizer):
    scores = _scores(tiny_moe("qwen2_moe"))
    expert_scores.save(scores, tmp_path / "importance")
    loaded = expert_scores.load(tmp_path / "importance")
    assert loaded.geometry == scores.geometry and loaded.calibration_loss == scores.calibration_loss
    assert loaded.curves == scores.curves and len(scores.curves) == 2
    kinds = ["attention", "channel", "group", "layer", "mlp", "shared"]
    assert loaded.width_curves == scores.width_curves and sorted(scores.width_curves) == kinds
    for name, per_layer in scores.stats.items():
        assert all(torch.equal(a, b) for a, b in zip(loaded.stats[name], per_layer))
    record = json.loads((tmp_path / "importance" / "experts.json").read_text())
    for key in ("kv_groups", "heads_per_group", "head_dim", "params_per_group"):
        del record["geometry"][key]  # as written before GQA groups (and their loss curves) were recorded
    del record["width_curves"]
    (tmp_path / "importance" / "experts.json").write_text(json.dumps(record))
    older = expert_scores.load(tmp_path / "importance")
    assert _plan(older, 0.5).kept == _plan(scores, 0.5).kept
    record = {**record, "geometry": scores.geometry.to_dict()}
    del record["geometry"]["layer_params"], record["geometry"]["sublayer_params"]  # as written before layer sizes
    # were recorded: its plans still save
    (tmp_path / "importance" / "experts.json").write_text(json.dumps(record))
    oldest = _plan(expert_scores.load(tmp_path / "importance"), 0.5)
    assert oldest.geometry.layer_params == () and oldest.kept == _plan(scores, 0.5).kept
    model = apply_expert_plan(tiny_moe("qwen2_moe"), oldest)  # the model scored above
    save_pruned(model, tiny_tokenizer, oldest, tmp_path / "pruned", source="org/tiny-moe")
    with pytest.raises(GqaPruneError, match="written before GQA groups were recorded"):
        _plan(older, 0.5, width_ratio=0.5)


def _saved_with_calibration(model, tokenizer, folder) -> None:
    """``model`` with ``tokenizer`` saved to folder/moe and 4 random blocks of 16 tokens to folder/calib.safetensors."""
    model.save_pretrained(folder / "moe")
    tokenizer.save_pretrained(folder / "moe")
    blocks = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    save_calibration(folder / "calib.safetensors", blocks, {"source": "random"})


def test_cli_importance_plan_prune_on_a_moe_model(tmp_path, capsys, tiny_tokenizer):
    _saved_with_calibration(tiny_moe("mixtral", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path)
    code, out, err = run(
        capsys, "importance", "--model", str(tmp_path / "moe"), "--calib", str(tmp_path / "calib.safetensors"),
        "--device", "cpu", "--out", str(tmp_path / "importance"),
    )  # fmt: skip
    assert code == 0, err
    assert "experts of 3 MoE layers" in out
    code, out, err = run(
        capsys, "plan", "--importance", str(tmp_path / "importance"), "--expert-ratio", "0.5", "--ratio", "0.5",
        "--out", str(tmp_path / "plan.json"),
    )  # fmt: skip
    assert code == 0, err
    assert "remove 50.00% of the experts (18 -> 9, GQA groups 6 -> 3" in out
    code, out, err = run(
        capsys, "prune", "--model", str(tmp_path / "moe"), "--plan", str(tmp_path / "plan.json"),
        "--out", str(tmp_path / "pruned"),
    )  # fmt: skip
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.num_local_experts == 3 and reloaded.config.num_key_value_heads == 1
    assert "stock (one expert count and width for every layer)" in (tmp_path / "pruned" / "README.md").read_text()
    code, out, err = run(
        capsys, "ppl", "--model", str(tmp_path / "pruned"), "--data-dir", str(DATA_DIR), "--window", "32",
        "--max-tokens", "64", "--device", "cpu", "--out", str(tmp_path / "ppl.json"),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] > 1
    code, out, err = run(  # experts, groups, channels and layers priced against each other by the measured curves
        capsys, "plan", "--importance", str(tmp_path / "importance"), "--expert-ratio", "0.25", "--ratio", "0.25",
        "--experts", "per-layer", "--whole-layers", "--out", str(tmp_path / "plan-per-layer.json"),
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run(
        capsys, "prune", "--model", str(tmp_path / "moe"), "--plan", str(tmp_path / "plan-per-layer.json"),
        "--out", str(tmp_path / "pruned-per-layer"),
    )  # fmt: skip
    assert code == 0, err
    per_layer = load_plan(tmp_path / "plan-per-layer.json")
    assert per_layer.allocation == "per-layer" and per_layer.groups is not None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned-per-layer")
    assert expert_geometry_of(reloaded) == per_layer.pruned_geometry()

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for router in ("frozen", "trainable"):
        code, out, err = run(
            capsys, "recover", "--model", str(tmp_path / "pruned"),
            "--train-blocks", str(tmp_path / "calib.safetensors"),
            "--steps", "3", "--warmup-steps", "0", "--lr", "0.01", "--router", router, "--device", "cpu",
            "--out", str(tmp_path / f"recovered-{router}"),
        )  # fmt: skip
        assert code == 0, err
        recovered = AutoModelForCausalLM.from_pretrained(tmp_path / f"recovered-{router}")  # stock, no remote code
        assert isinstance(load_plan(tmp_path / f"recovered-{router}" / "pruning_plan.json"), ExpertPlan)
        layer, before = recovered.model.layers[0].mlp, pruned.model.layers[0].mlp
        assert not torch.equal(layer.experts.gate_up_proj, before.experts.gate_up_proj)  # LoRA reached the experts
        assert torch.equal(layer.gate.weight, before.gate.weight) == (router == "frozen")
        assert (
            f"routers {'frozen' if router == 'frozen' else 'trained in full'}"
            in (tmp_path / f"recovered-{router}" / "README.md").read_text()
        )


def test_cli_prunes_and_recovers_a_moe_model_short_of_single_blocks(tmp_path, capsys, tiny_tokenizer):
    """A plan without layer 0's MoE block and layer 1's attention block: prune writes the project's per-layer
    config, recover trains LoRA on what is left and saves a checkpoint that reloads without those blocks."""
    model = tiny_moe("mixtral", vocab_size=len(tiny_tokenizer))
    _saved_with_calibration(model, tiny_tokenizer, tmp_path)
    geometry = expert_geometry_of(model)
    every = tuple(tuple(range(count)) for count in geometry.experts)
    plan = ExpertPlan(geometry, 0.0, "reap", every, parameter_count(model), allocation="per-layer",
                      removed_sublayers=((0, "mlp"), (1, "attention")))  # fmt: skip
    plan.save(tmp_path / "plan.json")
    code, out, err = run(
        capsys, "prune", "--model", str(tmp_path / "moe"), "--plan", str(tmp_path / "plan.json"),
        "--out", str(tmp_path / "pruned"),
    )  # fmt: skip
    assert code == 0, err
    assert "per-layer config" in out and "0 MoE, 1 attention" in (tmp_path / "pruned" / "README.md").read_text()
    code, out, err = run(
        capsys, "recover", "--model", str(tmp_path / "pruned"), "--train-blocks", str(tmp_path / "calib.safetensors"),
        "--steps", "2", "--warmup-steps", "0", "--lr", "0.01", "--device", "cpu", "--out", str(tmp_path / "recovered"),
    )  # fmt: skip
    assert code == 0, err
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    assert recovered.model.layers[0].mlp is None and recovered.model.layers[1].self_attn is None
    assert expert_geometry_of(recovered) == plan.pruned_geometry()
    changed = recovered.model.layers[2].mlp.experts.gate_up_proj
    assert not torch.equal(changed, pruned.model.layers[2].mlp.experts.gate_up_proj)  # LoRA reached the experts


def _gates_scaled(model, masks: list[torch.Tensor]):
    """Pre-hooks multiplying every routed slot's gate by its expert's mask (a leaf of ones): d loss / d mask is
    the first-order change of removing the expert, computed independently of the collector's gate hooks."""
    moe = moe_family_for(model.config)

    def scale(index):
        def hook(module, args, kwargs):
            values = [*args, *kwargs.values()]
            indices, gates = values[1], values[2]
            scaled = gates * masks[index][indices].to(gates.dtype)
            if len(args) >= 3:
                return (*args[:2], scaled, *args[3:]), kwargs
            key = list(kwargs)[2 - len(args)]
            return args, {**kwargs, key: scaled}

        return hook

    return [
        moe.sparse_block(layer).experts.register_forward_pre_hook(scale(index), with_kwargs=True)
        for index, layer in enumerate(moe.decoder_layers(model))
        if moe.sparse_block(layer) is not None
    ]


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_expert_taylor_and_fisher_match_a_direct_computation(family):
    """taylor = sum over batches of |w * dL/dw| over each expert's slices of the fused expert tensors; fisher = sum
    over samples of (d loss_n / d mask_e)^2, each sample run alone with a mask on its expert's gates."""
    model = tiny_moe(family)
    blocks = calibration_ids(blocks=4, length=16)
    scores = score_experts(copy.deepcopy(model), blocks, batch_size=2, curves=False, gradients=True)
    moe = moe_family_for(model.config)
    layers = moe.decoder_layers(model)
    reference = copy.deepcopy(model)
    taylor = [torch.zeros(n, dtype=torch.float64) for n in scores.geometry.experts]
    for batch in blocks.split(2):
        reference.zero_grad()
        reference(input_ids=batch, labels=batch).loss.backward()
        for index in scores.geometry.moe_layers:
            for tensor in moe.sparse_block(reference.model.layers[index]).experts.parameters(recurse=False):
                taylor[index] += (tensor * tensor.grad).abs().double().reshape(len(tensor), -1).sum(dim=1)
    fisher = [torch.zeros(n, dtype=torch.float64) for n in scores.geometry.experts]
    for sample in blocks.split(1):
        masks = [torch.ones(n, requires_grad=True) for n in scores.geometry.experts]
        handles = _gates_scaled(model, masks)
        loss = model(input_ids=sample, labels=sample).loss
        for handle in handles:
            handle.remove()
        gradients = torch.autograd.grad(loss, [masks[i] for i in scores.geometry.moe_layers])
        for index, gradient in zip(scores.geometry.moe_layers, gradients):
            fisher[index] += gradient.double().pow(2)
    for index in scores.geometry.moe_layers:
        torch.testing.assert_close(scores.stats["taylor"][index], taylor[index], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(scores.stats["fisher"][index], fisher[index], rtol=1e-3, atol=1e-10)
        assert (scores.stats["fisher"][index] > 0).all() and (scores.stats["taylor"][index] > 0).all()
    assert len(layers) == 3 and scores.info["gradients"] is True


def test_gradient_scores_rank_a_never_routed_and_a_useless_expert_last(tmp_path):
    model = tiny_moe("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[4] = -1e4  # expert 4 never wins a top-k slot
            layer.mlp.experts.down_proj[1].zero_()  # expert 1 is routed to but adds nothing
            layer.mlp.experts.down_proj_bias[1].zero_()
    scores = score_experts(copy.deepcopy(model), calibration_ids(), batch_size=2, curves=False, gradients=True)
    for name in ("taylor", "fisher"):
        for layer in scores.geometry.moe_layers:
            layer_scores = EXPERT_CRITERIA[name].scores(scores.layer_stats(layer), layer, 0)
            assert layer_scores[4] == 0 and layer_scores[1] == 0, name
            assert (layer_scores[[0, 2, 3, 5]] > 0).all(), name
        assert all(kept == (0, 2, 3, 5) for kept in _plan(scores, 2 / 6, name).kept)
    expert_scores.save(scores, tmp_path / "importance")
    assert expert_scores.load(tmp_path / "importance").stats["fisher"][0].tolist() == scores.stats["fisher"][0].tolist()


def test_cli_expert_gradient_scores_are_asked_for_by_criterion(tmp_path, capsys, tiny_tokenizer):
    _saved_with_calibration(tiny_moe("qwen3_moe", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path)
    common = ("--model", str(tmp_path / "moe"), "--calib", str(tmp_path / "calib.safetensors"), "--device", "cpu")
    code, out, err = run(capsys, "importance", *common, "--criterion", "obs", "--out", str(tmp_path / "obs"))
    assert_one_line_error(code, err, "--criterion obs: a mixture of experts is scored by its expert statistics")
    assert not (tmp_path / "obs").exists()
    for criterion in (None, "fisher"):
        option = () if criterion is None else ("--criterion", criterion)
        folder = tmp_path / f"importance-{criterion}"
        code, out, err = run(capsys, "importance", *common, *option, "--no-curves", "--out", str(folder))
        assert code == 0, err
        assert ("taylor, fisher" in out) == (criterion is not None), out
    plan = ("--expert-ratio", "0.5", "--out", str(tmp_path / "plan.json"))
    code, out, err = run(capsys, "plan", "--importance", str(tmp_path / "importance-None"), "--expert-criterion",
                         "taylor", *plan)  # fmt: skip
    assert_one_line_error(code, err, "expert criterion taylor needs the experts' gradients")
    assert not (tmp_path / "plan.json").exists()
    code, out, err = run(capsys, "plan", "--importance", str(tmp_path / "importance-fisher"), "--expert-criterion",
                         "taylor", *plan)  # fmt: skip
    assert code == 0, err
    assert load_plan(tmp_path / "plan.json").criterion == "taylor"
    code, out, err = run(capsys, "plan", "--importance", str(tmp_path / "importance-None"), "--whole-layers",
                         "--expert-ratio", "0.5", "--out", str(tmp_path / "layers.json"))  # fmt: skip
    assert_one_line_error(code, err, "--whole-layers prices layers against experts by measured loss curves: it needs")
    code, out, err = run(capsys, "plan", "--importance", str(tmp_path / "importance-None"), "--whole-layers",
                         "--experts", "per-layer", "--expert-ratio", "0.5",
                         "--out", str(tmp_path / "layers.json"))  # fmt: skip
    assert_one_line_error(code, err, "--experts per-layer prices layers by measured loss curves; these scores lack")
    assert not (tmp_path / "layers.json").exists()
