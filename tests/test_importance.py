"""Importance: one-pass Taylor equals an explicit reference; other criteria; layer scores; NaN refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import calibration_ids, tiny_model

from gqa_prune import importance, scores
from gqa_prune.errors import GqaPruneError

HEAD_DIM = 8
BLOCKS = calibration_ids(blocks=4, length=16, seed=5)


def _reference_unit_scores(model, heads_per_group: int, salience_of) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Explicit per-group / per-channel sums written out head by head (independent of gqa_prune.reduce)."""
    groups, channels = [], []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (salience_of(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        q_bias, k_bias, v_bias = (
            salience_of(getattr(attention, name), bias=True) for name in ("q_proj", "k_proj", "v_proj")
        )
        num_groups = k.shape[0] // HEAD_DIM
        scores = torch.zeros(num_groups)
        for group in range(num_groups):
            kv_rows = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
            scores[group] += k[kv_rows].sum() + v[kv_rows].sum() + k_bias[kv_rows].sum() + v_bias[kv_rows].sum()
            for head in range(group * heads_per_group, (group + 1) * heads_per_group):
                rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                scores[group] += q[rows].sum() + q_bias[rows].sum() + o[:, rows].sum()
        groups.append(scores)
        gate, up, down = (salience_of(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj"))
        channels.append(gate.sum(1) + up.sum(1) + down.sum(0))
    return groups, channels


def _assert_scores_close(result, groups, channels):
    for layer, (expected_groups, expected_channels) in enumerate(zip(groups, channels)):
        torch.testing.assert_close(result.units["gqa_group"][layer], expected_groups, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(result.units["mlp_channel"][layer], expected_channels, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen2", 4), ("qwen3", 1)])
def test_one_pass_taylor_equals_explicit_reference(family, heads_per_group):
    model = tiny_model(family, heads_per_group)
    result = importance.score(copy.deepcopy(model), BLOCKS, "taylor", batch_size=2)

    # reference: ordinary backward per batch keeping every .grad, then |w * g| summed per unit, summed over batches
    reference = copy.deepcopy(model)
    totals = None
    for batch in BLOCKS.split(2):
        reference.zero_grad(set_to_none=True)
        reference(input_ids=batch, labels=batch).loss.backward()

        def taylor(linear, bias=False):
            parameter = linear.bias if bias else linear.weight
            if parameter is None:
                return torch.zeros(linear.out_features)
            return (parameter.detach() * parameter.grad).abs()

        groups, channels = _reference_unit_scores(reference, heads_per_group, taylor)
        totals = (
            (groups, channels)
            if totals is None
            else ([a + b for a, b in zip(totals[0], groups)], [a + b for a, b in zip(totals[1], channels)])
        )
    _assert_scores_close(result, *totals)
    assert result.info["forward_backward_passes"] == 2


def test_magnitude_is_l1_of_unit_weights():
    model = tiny_model("qwen2", 3)  # q/k/v biases count as the unit's weights
    result = importance.score(model, BLOCKS, "magnitude")

    def magnitude(linear, bias=False):
        parameter = linear.bias if bias else linear.weight
        return torch.zeros(linear.out_features) if parameter is None else parameter.detach().abs()

    _assert_scores_close(result, *_reference_unit_scores(model, 3, magnitude))


def test_activation_weights_columns_by_input_norms():
    model = tiny_model("llama", 3)
    norms = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: norms.__setitem__(
                name, norms.get(name, 0) + args[0].detach().pow(2).flatten(0, -2).sum(0)
            )
        )
        for name, module in model.named_modules()
        if name.endswith("_proj")
    ]
    with torch.no_grad():
        for batch in BLOCKS.split(4):
            model(batch)
    for hook in hooks:
        hook.remove()
    names = {id(module): name for name, module in model.named_modules()}

    def wanda(linear, bias=False):
        if bias:
            return torch.zeros(linear.out_features)
        return linear.weight.detach().abs() * norms[names[id(linear)]].sqrt().unsqueeze(0)

    _assert_scores_close(importance.score(model, BLOCKS, "activation"), *_reference_unit_scores(model, 3, wanda))


def test_random_scores_follow_the_seed():
    model = tiny_model("mistral", 4)
    first, again, other = (importance.score(model, BLOCKS, "random", seed=seed) for seed in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first.units["gqa_group"], again.units["gqa_group"]))
    assert not all(torch.equal(a, b) for a, b in zip(first.units["mlp_channel"], other.units["mlp_channel"]))


def test_scoring_leaves_the_model_untouched():
    model = tiny_model("llama", 3)
    model.lm_head.weight.requires_grad_(False)  # a non-default flag must survive too
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    importance.score(model, BLOCKS, "taylor", layer_criteria=("block_influence", "removal"))
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert flags == {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    assert all(parameter.grad is None for parameter in model.parameters())
    assert len(model.model.layers) == 3 and not model.training


def test_layer_that_does_nothing_scores_zero():
    model = tiny_model("llama", 3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: output == input
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.bias.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    result = importance.score(model, BLOCKS, "magnitude", layer_criteria=("block_influence", "activation", "removal"))
    assert result.layer_scores["block_influence"][1] == pytest.approx(0.0, abs=1e-6)
    assert result.layer_scores["removal"][1] == pytest.approx(0.0, abs=1e-6)
    assert min(result.layer_scores["block_influence"][0], result.layer_scores["block_influence"][2]) > 1e-3
    assert set(result.layer_scores) == {"block_influence", "activation", "removal"}


def test_non_finite_scores_are_refused_and_nothing_is_written(tmp_path):
    model = tiny_model("llama", 3)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(GqaPruneError, match="NaN/Inf"):
        importance.score(model, BLOCKS, "magnitude")
    result = importance.score(tiny_model("llama", 3), BLOCKS, "magnitude")
    result.units["mlp_channel"][2][0] = float("nan")  # scores that turn non-finite after scoring are not saved either
    with pytest.raises(GqaPruneError, match=r"mlp_channel\.2 contain NaN/Inf"):
        scores.save(result, tmp_path / "scores")
    assert not list(tmp_path.iterdir())


def test_saved_scores_round_trip_and_tampered_scores_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    result = importance.score(tiny_model("qwen3", 3), BLOCKS, "taylor")
    scores.save(result, tmp_path / "scores")
    loaded = scores.load(tmp_path / "scores")
    assert loaded.geometry == result.geometry and loaded.structural == result.structural
    assert loaded.curves == result.curves and set(loaded.curves) == {
        "layer",
        "attn_sublayer",
        "mlp_sublayer",
        "gqa_group",
        "mlp_channel",
    }
    assert all(torch.equal(a, b) for a, b in zip(loaded.units["mlp_channel"], result.units["mlp_channel"]))

    units_file = tmp_path / "scores" / scores.UNITS_FILE
    tensors = load_file(str(units_file))
    tensors["gqa_group.1"][0] = float("inf")
    save_file(tensors, str(units_file))
    with pytest.raises(GqaPruneError, match=r"gqa_group\.1 contain NaN/Inf"):
        scores.load(tmp_path / "scores")


def test_saved_scores_are_byte_identical_save_after_save(tmp_path):
    # the same scores must give the same file, or a Slurm run and a local run could not be compared by hash
    result = importance.score(tiny_model("llama", 3), BLOCKS, "magnitude")
    files = set()
    for attempt in range(8):
        scores.save(result, tmp_path / f"scores{attempt}")
        files.add((tmp_path / f"scores{attempt}" / scores.UNITS_FILE).read_bytes())
    assert len(files) == 1


def test_bad_criteria_and_foreign_tokens_are_refused():
    model = tiny_model("llama", 3)
    with pytest.raises(GqaPruneError, match="unit criterion 'hessian' is not one of taylor, fisher, obs, magnitude"):
        importance.score(model, BLOCKS, "hessian")
    with pytest.raises(GqaPruneError, match="layer criterion 'depth' is not one of"):
        importance.score(model, BLOCKS, "taylor", layer_criteria=("depth",))
    with pytest.raises(GqaPruneError, match="calibration token id 500 >= vocab size 96"):
        importance.score(model, torch.full((1, 4), 500), "taylor")


def test_loss_curves_default_to_the_first_blocks_holding_curve_tokens(monkeypatch):
    model = tiny_model("llama", 3)
    monkeypatch.setattr(importance, "CURVE_TOKENS", 2 * BLOCKS.shape[1] - 1)  # 2 blocks hold it
    default = importance.score(model, BLOCKS, "taylor")
    two = importance.score(model, BLOCKS, "taylor", curve_blocks=2)
    every = importance.score(model, BLOCKS, "taylor", curve_blocks=len(BLOCKS))
    assert default.info["curve_blocks"] == two.info["curve_blocks"] == 2 < len(BLOCKS)
    assert default.curves == two.curves != every.curves


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_backward_scoring_frees_each_batch_activations(criterion):
    """Nothing of a batch's graph outlives its backward (a hook holding its own tensor kept ~1 GB per
    2048-token block of SmolLM2 alive, so fisher on 32 blocks ran out of memory)."""
    import gc
    import weakref

    from gqa_prune.arch import adapter_for

    model = tiny_model("llama", 3)
    adapter = adapter_for(model.config)
    alive = []
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: alive.append(weakref.ref(args[0])))
        for layer in adapter.decoder_layers(model)
    ]
    try:
        importance.score(model, BLOCKS, criterion, curves=False)
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    assert alive and not [ref for ref in alive if ref() is not None]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("criterion", ["fisher", "obs"])
def test_second_order_scores_are_finite_deterministic_and_rank_a_planted_useless_unit_last(criterion, family):
    """A GQA group whose o_proj columns and an MLP channel whose down_proj column are zero contribute nothing:
    removing them changes no output, so Fisher and OBS must score them lowest in their layer."""
    model = tiny_model(family, 3 if family != "qwen3" else 2)
    heads = model.config.num_attention_heads // model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    width = heads * head_dim
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.self_attn.o_proj.weight[:, width : 2 * width] = 0  # group 1 of layer 1
        layer.mlp.down_proj.weight[:, 5] = 0  # channel 5 of layer 1
    first = importance.score(copy.deepcopy(model), BLOCKS, criterion, curves=False)
    second = importance.score(copy.deepcopy(model), BLOCKS, criterion, curves=False)
    for kind, planted in (("gqa_group", 1), ("mlp_channel", 5)):
        values = first.units[kind][1]
        assert torch.isfinite(values).all() and all(torch.isfinite(v).all() for v in first.units[kind])
        assert torch.equal(values, second.units[kind][1])
        assert int(values.argmin()) == planted and float(values[planted]) == pytest.approx(0.0, abs=1e-9)
        others = torch.cat([values[:planted], values[planted + 1 :]])
        assert float(others.min()) > 0
