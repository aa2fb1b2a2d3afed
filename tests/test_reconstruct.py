"""Least-squares reconstruction on tiny random models: never worse than slicing, a no-op plan changes
nothing, the closed form equals a direct least-squares solve, sequential fits use the pruned activations."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import LAYOUTS, calibration_ids, plan_for, tiny_model

from gqa_prune.errors import GqaPruneError
from gqa_prune.reconstruct import ReconstructionSettings, output_error, reconstruct, refit_columns
from gqa_prune.surgery import apply_plan, apply_plan_as_mask
from gqa_prune.units import KINDS

BLOCKS = calibration_ids(blocks=8, length=32, seed=4)
INPUTS = calibration_ids(blocks=2, length=12, seed=1)


def test_refit_equals_a_direct_least_squares_solve():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    gram = inputs.T @ inputs
    ridge = 0.3
    refit = refit_columns(weight, gram, kept, ridge)
    # the same problem as one stacked least-squares system: data rows, then the ridge rows pulling to W_K
    damping = (ridge * gram[kept][:, kept].diagonal()).sqrt()
    design = torch.cat([inputs[:, kept], torch.diag(damping)])
    target = torch.cat([inputs @ weight.T, damping.unsqueeze(1) * weight[:, kept].T])
    direct = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(refit, direct, rtol=1e-9, atol=1e-9)
    # a vanishing ridge is plain least squares
    plain = torch.linalg.lstsq(inputs[:, kept], inputs @ weight.T).solution.T
    torch.testing.assert_close(refit_columns(weight, gram, kept, 1e-12), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
@pytest.mark.parametrize(("target", "select"), [("own", "obs"), ("own", "plan"), ("dense", "obs")])
def test_reconstruction_never_increases_a_layers_error_and_prunes_equivalently(family, heads_per_group, target, select):
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model, protected_layers=(0,))
    refit = copy.deepcopy(model)
    applied, report = reconstruct(refit, plan, BLOCKS, ReconstructionSettings(target=target, select=select))
    for planned, kept in zip(plan.layers, applied.layers):  # as many units as the plan says, of each kind
        assert {kind: len(units) for kind, units in kept.kept.items()} == {
            kind: len(units) for kind, units in planned.kept.items()
        }
        assert kept.removed == planned.removed
    if select == "plan":
        assert applied == plan
    for entry in report["layers"]:
        for name in ("o_proj", "down_proj"):
            if name in entry:
                assert entry[name]["refit_error"] <= entry[name]["sliced_error"] * (1 + 1e-9) + 1e-9
    assert any(entry.get("down_proj", {}).get("refit_error", 0) < entry.get("down_proj", {}).get("sliced_error", 0)
               for entry in report["layers"])  # fmt: skip
    masked = copy.deepcopy(refit)
    pruned = apply_plan(refit, applied)  # the refitted masked model slices to an equivalent pruned one
    with torch.no_grad():
        assert (pruned(INPUTS).logits - masked(INPUTS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("target", "inputs"), [("own", False), ("dense", False), ("own", True)])
def test_a_plan_that_removes_nothing_leaves_the_weights_unchanged(target, inputs):
    model = tiny_model("qwen2", 3)
    plan = plan_for(model, attn_ratio=0.0, mlp_ratio=0.0)
    refit = copy.deepcopy(model)
    reconstruct(refit, plan, BLOCKS, ReconstructionSettings(target=target, inputs=inputs))
    for (name, before), after in zip(model.state_dict().items(), refit.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6, msg=name)


def test_sequential_fits_use_the_pruned_models_activations():
    model = tiny_model("llama", 3)
    plan = plan_for(model)
    refit = copy.deepcopy(model)
    applied, _ = reconstruct(refit, plan, BLOCKS, ReconstructionSettings())
    last = len(model.model.layers) - 1
    kept = torch.tensor(applied.layers[last].kept_mlp_channels)

    def down_proj_gram(source) -> torch.Tensor:
        grams = []
        hook = source.model.layers[last].mlp.down_proj.register_forward_pre_hook(
            lambda m, args: grams.append(args[0].flatten(0, -2).double().T @ args[0].flatten(0, -2).double())
        )
        with torch.no_grad():
            for batch in BLOCKS.split(1):
                source(batch)
        hook.remove()
        return sum(grams)

    original = model.model.layers[last].mlp.down_proj.weight
    written = refit.model.layers[last].mlp.down_proj.weight[:, kept].double()
    # the refitted model's own activations reproduce what was written; the dense model's do not
    ridge = ReconstructionSettings().ridge
    from_pruned = refit_columns(original, down_proj_gram(refit), kept, ridge)
    from_dense = refit_columns(original, down_proj_gram(model), kept, ridge)
    torch.testing.assert_close(written, from_pruned, rtol=1e-4, atol=1e-5)
    assert (written - from_dense).abs().max() > 1e-3


INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@pytest.mark.parametrize(("family", "heads_per_group"), LAYOUTS)
def test_the_input_refit_never_increases_a_projections_error_and_prunes_equivalently(family, heads_per_group):
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model, protected_layers=(0,))
    refit = copy.deepcopy(model)
    applied, report = reconstruct(refit, plan, BLOCKS, ReconstructionSettings(inputs=True))
    fitted = [entry[name] for entry in report["layers"] for name in INPUT_PROJECTIONS if name in entry]
    assert len(fitted) == len(INPUT_PROJECTIONS) * len(report["layers"])
    for errors in fitted:
        assert errors["refit_error"] <= errors["before_error"] * (1 + 1e-9) + 1e-9
    assert any(errors["refit_error"] < 0.99 * errors["before_error"] for errors in fitted)
    # layer 0 is protected and first: its attention reads the dense stream, so its q/k/v stay as they were
    first, dense_first = refit.model.layers[0].self_attn, model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(first, name).weight, getattr(dense_first, name).weight, rtol=0, atol=1e-5)
    masked = copy.deepcopy(refit)
    pruned = apply_plan(refit, applied)
    with torch.no_grad():
        assert (pruned(INPUTS).logits - masked(INPUTS).logits).abs().max().item() <= 1e-5


def test_the_input_refit_fits_the_dense_outputs_from_the_pruned_models_inputs():
    model = tiny_model("qwen2", 3)  # q/k/v with biases: the fit leaves them, the target excludes them
    plan = plan_for(model)
    refit = copy.deepcopy(model)
    reconstruct(refit, plan, BLOCKS, ReconstructionSettings(inputs=True))
    last = len(model.model.layers) - 1

    def inputs_and_outputs(source) -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        projection = source.model.layers[last].self_attn.k_proj
        hook = projection.register_forward_hook(lambda m, args, out: seen.append((args[0], out - m.bias)))
        with torch.no_grad():
            for batch in BLOCKS.split(1):
                source(batch)
        hook.remove()
        return tuple(torch.cat([pair[i].flatten(0, -2).double() for pair in seen]) for i in (0, 1))

    x_pruned, _ = inputs_and_outputs(refit)
    _, y_dense = inputs_and_outputs(model)
    original = model.model.layers[last].self_attn.k_proj.weight
    every = torch.arange(x_pruned.shape[1])
    expected = refit_columns(
        original, x_pruned.T @ x_pruned, every, ReconstructionSettings().ridge, x_pruned.T @ y_dense
    )
    torch.testing.assert_close(
        refit.model.layers[last].self_attn.k_proj.weight.double(), expected, rtol=1e-4, atol=1e-5
    )


def test_removed_sublayers_and_layers_are_masked_and_their_neighbours_refit():
    from test_depth import mixed_plan

    model = tiny_model("llama", 3, layers=5)
    plan = mixed_plan(model)
    refit = copy.deepcopy(model)
    applied, report = reconstruct(refit, plan, BLOCKS, ReconstructionSettings(target="dense"))
    assert "o_proj" not in report["layers"][1] and "down_proj" not in report["layers"][2]
    assert report["layers"][3] == {"layer": 3}
    masked = apply_plan_as_mask(copy.deepcopy(refit), applied)
    with torch.no_grad():
        assert (apply_plan(refit, applied)(INPUTS).logits - masked(INPUTS).logits).abs().max().item() <= 1e-5


def test_bad_calibration_and_non_finite_refits_are_refused():
    model = tiny_model("llama", 3)
    plan = plan_for(model)
    with pytest.raises(GqaPruneError, match="calibration token id 500 >= vocab size 96"):
        reconstruct(copy.deepcopy(model), plan, torch.full((2, 8), 500))
    with pytest.raises(GqaPruneError, match="calibration has 16 tokens but the refit of a projection with"):
        reconstruct(copy.deepcopy(model), plan, BLOCKS[:1, :16])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, plan.layers[1].kept_mlp_channels[0]] = float("nan")
    with pytest.raises(GqaPruneError, match="layer 1: the refit of down_proj is not finite"):
        reconstruct(broken, plan, BLOCKS)
    with pytest.raises(GqaPruneError, match="reconstruction ridge 0 must be a finite number > 0"):
        reconstruct(copy.deepcopy(model), plan, BLOCKS, ReconstructionSettings(ridge=0))


def _objective(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> float:
    """Brute force: the refit's own objective (output error + pull to the original columns) left when only
    ``kept`` columns stay, refit by ``refit_columns`` (itself checked against lstsq above)."""
    refit = refit_columns(weight, gram, kept, ridge)
    pull = ridge * gram.diagonal()[kept] * (refit - weight[:, kept]).pow(2).sum(0)
    return output_error(weight, refit, gram, kept) + float(pull.sum())


@pytest.mark.parametrize("ridge", [0.01, 0.5])
@pytest.mark.parametrize("width", [1, 3])
def test_greedy_obs_selection_equals_brute_force_sequential_least_squares(width, ridge):
    from gqa_prune.criteria.obs import greedy_obs_keep

    generator = torch.Generator().manual_seed(width)
    groups = 6
    inputs = torch.randn(300, groups * width, generator=generator, dtype=torch.float64)
    inputs[:, width : 2 * width] = inputs[:, :width] + 0.01 * inputs[:, width : 2 * width]  # near-duplicate groups
    weight = torch.randn(4, groups * width, generator=generator, dtype=torch.float64)
    gram = inputs.T @ inputs
    alive = list(range(groups))

    def columns(units: list[int]) -> torch.Tensor:
        return torch.tensor([unit * width + i for unit in units for i in range(width)])

    for remove in range(1, 4):
        alive.remove(min(alive, key=lambda g: _objective(weight, gram, columns([a for a in alive if a != g]), ridge)))
        assert greedy_obs_keep(weight, gram, width, remove, ridge=ridge).tolist() == alive
    assert not {0, 1} <= set(alive)  # one of the near-duplicates went


def test_greedy_obs_past_its_step_limit_removes_several_groups_per_step(monkeypatch):
    from gqa_prune.criteria import obs

    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    gram = inputs.T @ inputs
    monkeypatch.setattr(obs, "MAX_GREEDY_STEPS", 1)  # one step: the 3 groups of least single-removal error go
    single = {g: _objective(weight, gram, torch.tensor([c for c in range(8) if c != g]), 0.5) for g in range(8)}
    expected = sorted(sorted(single, key=single.get)[3:])
    assert obs.greedy_obs_keep(weight, gram, 1, 3, ridge=0.5).tolist() == expected


def test_the_exact_inverse_of_the_groups_left_equals_the_obs_downdates():
    from gqa_prune.criteria.obs import alive_inverse

    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(100, 12, generator=generator, dtype=torch.float64)
    damped = inputs.T @ inputs + torch.eye(12, dtype=torch.float64)
    inverse = torch.linalg.inv(damped)
    alive = torch.ones(4, dtype=torch.bool)
    for group in (2, 0):  # remove groups of 3 columns one by one, as greedy_obs_keep does
        columns = torch.arange(3 * group, 3 * group + 3)
        rows = inverse[columns]
        inverse = inverse - rows.T @ torch.linalg.inv(inverse[columns][:, columns]) @ rows
        alive[group] = False
        torch.testing.assert_close(alive_inverse(damped, alive, 3), inverse, rtol=1e-9, atol=1e-9)


def test_a_non_finite_gram_is_refused_by_the_obs_choice_naming_the_layer():
    from gqa_prune.criteria.obs import greedy_obs_keep

    gram = torch.eye(6, dtype=torch.float64)
    gram[1, 1] = float("inf")
    with pytest.raises(torch.linalg.LinAlgError, match="Gram matrix is not finite"):
        greedy_obs_keep(torch.ones(2, 6), gram, 3, 1, ridge=0.3)
    model = tiny_model("llama", 3)
    plan = plan_for(model)
    with torch.no_grad():  # attention outputs of layer 1 are NaN: so is o_proj's Gram
        model.model.layers[1].self_attn.v_proj.weight.fill_(float("nan"))
    with pytest.raises(GqaPruneError, match=r"^layer 1: the OBS choice of gqa_group units failed \(the inputs' Gram"):
        reconstruct(model, plan, BLOCKS)


def test_obs_selection_lowers_the_output_error_of_the_plans_units_and_learned_plans_keep_theirs():
    model = tiny_model("llama", 3)
    plan = plan_for(model)
    _, by_plan = reconstruct(copy.deepcopy(model), plan, BLOCKS, ReconstructionSettings(select="plan"))
    applied, by_obs = reconstruct(copy.deepcopy(model), plan, BLOCKS, ReconstructionSettings(select="obs"))
    first = 0  # the first layer sees the same inputs either way: its refit errors compare like for like
    assert by_obs["layers"][first]["down_proj"]["refit_error"] < by_plan["layers"][first]["down_proj"]["refit_error"]
    assert by_obs["layers"][first]["down_proj"]["units_changed"] > 0
    assert applied.layers[first].kept_mlp_channels != plan.layers[first].kept_mlp_channels
    learned = dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, mode="learned"))
    kept, report = reconstruct(copy.deepcopy(model), learned, BLOCKS, ReconstructionSettings(select="obs"))
    assert kept == learned and not report["reselected"]


@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen3", 2)])
def test_with_the_obs_choice_the_model_depends_only_on_how_many_units_each_layer_keeps(family, heads_per_group):
    """bench/quality.py reuses a row's figures for a plan with the same per-layer counts: this is why."""
    model = tiny_model(family, heads_per_group)
    plan = plan_for(model)
    others = []  # the same number of units per layer and kind, other ones: the last instead of the planned
    for layer in plan.layers:
        kept = {kind: tuple(range(KINDS[kind].count(plan.geometry, layer.layer)))[-len(units):] if units else ()
                for kind, units in layer.kept.items()}  # fmt: skip
        others.append(dataclasses.replace(layer, kept=kept))
    other = dataclasses.replace(plan, layers=tuple(others))
    assert other != plan
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    applied, _ = reconstruct(first, plan, BLOCKS, ReconstructionSettings(select="obs"))
    applied_other, _ = reconstruct(second, other, BLOCKS, ReconstructionSettings(select="obs"))
    assert applied == applied_other
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    # with the plan's own units the two plans are two different models
    third = copy.deepcopy(model)
    reconstruct(third, other, BLOCKS, ReconstructionSettings(select="plan"))
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))
