"""Learned hard-concrete (L0) masks: the distribution's formulas, GQA tying, the size constraint, and masks ->
plan -> prune giving the masked model's logits. Tiny random models only (the whole file runs in well under a
minute on 2 CPU cores)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import calibration_ids, tiny_model

from gqa_prune import scores as stored_scores
from gqa_prune.arch import ATTENTION_ROLES, adapter_for, geometry_of
from gqa_prune.choices import UNIT_KINDS
from gqa_prune.cli import main
from gqa_prune.data import save_calibration
from gqa_prune.errors import GqaPruneError
from gqa_prune.hard_concrete import HardConcrete, deterministic_count, expand_group_mask
from gqa_prune.learn_masks import (
    MaskParameters,
    as_unit_masks,
    deterministic,
    learn_masks,
    removed_ratio,
    save_learned,
)
from gqa_prune.mask_settings import MaskSettings
from gqa_prune.passes import unit_masks
from gqa_prune.planning import SIZE_TOLERANCE, PlanSettings, PruningPlan, build_plan
from gqa_prune.surgery import apply_plan
from gqa_prune.units import KINDS

RATIO = 0.3
STEPS = 100  # bounded: the expected size must be on the target after this many steps


def _settings(**overrides) -> MaskSettings:
    values = dict(ratio=RATIO, steps=STEPS, warmup_steps=50, channel_multiple=1, stats_blocks=4)
    values.update(overrides)
    return MaskSettings(**values)


@pytest.fixture(scope="module")
def learned():
    """Masks learned on a tiny Llama (4 layers, 3 query heads per KV head, attention biases)."""
    torch.set_num_threads(1)
    model = tiny_model("llama", 3, layers=4)
    blocks = calibration_ids(96, blocks=8, length=16)
    return model, blocks, learn_masks(model, blocks, _settings())


# ----------------------------------------------------------------------------------------------- the distribution
@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_monte_carlo_matches_the_closed_form_probabilities(log_alpha):
    distribution = HardConcrete()
    samples = distribution.sample(torch.full((400_000,), log_alpha), torch.Generator().manual_seed(0))
    expected_nonzero = float(distribution.prob_nonzero(torch.tensor(log_alpha)))
    expected_one = float(distribution.prob_one(torch.tensor(log_alpha)))
    # 400k samples: the standard error of a frequency is below 0.0008
    assert abs(float((samples > 0).float().mean()) - expected_nonzero) < 0.004
    assert abs(float((samples == 1).float().mean()) - expected_one) < 0.004
    assert samples.min() >= 0 and samples.max() <= 1
    # the closed forms, written out independently
    shift = (2 / 3) * math.log(0.1 / 1.1)
    assert expected_nonzero == pytest.approx(1 / (1 + math.exp(-(log_alpha - shift))), rel=1e-5)


def test_a_sample_is_the_stretched_clipped_binary_concrete():
    distribution = HardConcrete(beta=0.5, lower=-0.2, upper=1.3)
    log_alpha = torch.tensor([-1.0, 0.3, 2.0])
    uniform = torch.tensor([0.2, 0.5, 0.9])
    by_hand = [
        min(1.0, max(0.0, (1 / (1 + math.exp(-(math.log(u / (1 - u)) + a) / 0.5))) * 1.5 - 0.2))
        for a, u in zip(log_alpha.tolist(), uniform.tolist())
    ]
    assert distribution.from_uniform(log_alpha, uniform).tolist() == pytest.approx(by_hand, abs=1e-6)


def test_the_gradient_through_the_mask_is_the_closed_form_derivative():
    distribution = HardConcrete()
    log_alpha = torch.linspace(-3, 3, 25, requires_grad=True)
    uniform = torch.rand(25, generator=torch.Generator().manual_seed(1)).clamp(0.01, 0.99)
    mask = distribution.from_uniform(log_alpha, uniform)
    (gradient,) = torch.autograd.grad(mask.sum(), log_alpha)
    s = torch.sigmoid((torch.log(uniform) - torch.log1p(-uniform) + log_alpha.detach()) / distribution.beta)
    inside = (mask.detach() > 0) & (mask.detach() < 1)
    closed = torch.where(inside, (1.1 + 0.1) * s * (1 - s) / distribution.beta, torch.zeros_like(s))
    assert inside.any() and (~inside).any()  # both branches are exercised
    assert torch.allclose(gradient, closed, atol=1e-6)
    # expected L0: d sigmoid(log_alpha - shift) / d log_alpha = p (1 - p)
    (gradient,) = torch.autograd.grad(distribution.prob_nonzero(log_alpha).sum(), log_alpha)
    p = distribution.prob_nonzero(log_alpha.detach())
    assert torch.allclose(gradient, p * (1 - p), atol=1e-7)


def test_expected_size_is_the_closed_form_and_its_gradient_the_finite_difference():
    model = tiny_model("qwen2", 3, layers=2)
    geometry = geometry_of(model)
    parameters = MaskParameters(geometry, UNIT_KINDS, 1.0)
    distribution = HardConcrete()
    with torch.no_grad():
        for log_alpha in parameters.parameters():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=torch.Generator().manual_seed(log_alpha.numel())))
    p = {name: distribution.prob_nonzero(value.detach()) for name, value in parameters.log_alpha.items()}
    by_hand = sum(
        p[f"layer__{i}"]
        * (
            p[f"attn_sublayer__{i}"] * p[f"gqa_group__{i}"].sum() * geometry.params_per_group
            + p[f"mlp_sublayer__{i}"] * p[f"mlp_channel__{i}"].sum() * geometry.params_per_channel
        )
        for i in range(geometry.num_layers)
    )
    expected = parameters.expected_remaining(distribution)
    assert float(expected.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    expected.backward()
    layer = parameters.log_alpha["layer__1"]
    step = 1e-2  # float32 sums of ~1e4: a larger step keeps rounding out of the difference
    with torch.no_grad():
        layer += step
        up = float(parameters.expected_remaining(distribution))
        layer -= 2 * step
        down = float(parameters.expected_remaining(distribution))
        layer += step
    assert float(layer.grad) == pytest.approx((up - down) / (2 * step), rel=2e-3)


def test_deterministic_counts_round_to_allowed_sizes():
    assert deterministic_count(2.4, 4) == 2 and deterministic_count(2.5, 4) == 3  # ties keep more
    assert deterministic_count(37.0, 64, 8) == 40 and deterministic_count(3.0, 64, 8) == 0
    assert deterministic_count(61.0, 64, 48) == 64  # a width that is not a multiple may stay whole


# ----------------------------------------------------------------------------------------------- GQA tying
@pytest.mark.parametrize("heads_per_group", [1, 3, 4])
def test_every_query_head_of_a_group_has_its_kv_heads_mask(heads_per_group):
    model = tiny_model("mistral", heads_per_group, layers=2)
    geometry, adapter = geometry_of(model), adapter_for(model.config)
    parameters = MaskParameters(geometry, UNIT_KINDS, 0.0)
    assert [len(parameters.get("gqa_group", i)) for i in range(2)] == list(geometry.kv_groups)  # one per KV head
    masks = parameters.sample(HardConcrete(), torch.Generator().manual_seed(3))
    only_groups = {1: {"gqa_group": masks[1]["gqa_group"]}}  # layer 1 only: its inputs are the same either way
    seen = []
    o_proj = adapter.projection(adapter.decoder_layers(model)[1], ATTENTION_ROLES[3])
    capture = lambda m, args: seen.append(args[0].detach())  # noqa: E731
    ids = calibration_ids(96, blocks=1, length=8)
    with torch.no_grad():
        handle = o_proj.register_forward_pre_hook(capture)
        model(input_ids=ids)
        handle.remove()
        with unit_masks(model, adapter, geometry, only_groups):
            handle = o_proj.register_forward_pre_hook(capture)  # after the mask's hook: sees the masked input
            model(input_ids=ids)
            handle.remove()
    # per column, the factor the masks applied to the o_proj input (the heads' outputs): (positions, heads, dim)
    factor = (seen[1] / seen[0]).reshape(-1, geometry.kv_groups[1] * heads_per_group, geometry.head_dim)
    per_head = factor[0, :, 0]
    assert torch.allclose(factor, per_head[None, :, None].expand_as(factor), atol=1e-5)  # every position and dim
    group_mask = masks[1]["gqa_group"].detach()
    assert torch.allclose(per_head, expand_group_mask(group_mask, heads_per_group), atol=1e-5)
    for head in range(len(per_head)):
        assert per_head[head] == pytest.approx(float(group_mask[head // heads_per_group]), abs=1e-5)


# ----------------------------------------------------------------------------------------------- training
def test_expected_and_deterministic_size_reach_the_target(learned):
    model, _, result = learned
    target_size = 1 - RATIO
    history = result.history
    assert len(history) == STEPS
    assert abs((1 - history[-1].expected_ratio) - target_size) <= SIZE_TOLERANCE * target_size
    geometry = geometry_of(model)
    assert abs((1 - removed_ratio(geometry, result.scores.masks)) - target_size) <= SIZE_TOLERANCE * target_size
    assert history[0].target_ratio < history[-1].target_ratio == RATIO  # warm-up of the target
    assert history[-1].lambda2 >= 100.0 and all(math.isfinite(step.loss) for step in history)


def test_masks_to_plan_to_prune_give_the_masked_models_logits(learned, tmp_path):
    model, blocks, result = learned
    save_learned(result, tmp_path / "l0")
    scores = stored_scores.load(tmp_path / "l0")
    assert scores.criterion == "l0" and set(scores.masks) == set(KINDS)
    for kind in KINDS:
        assert all(torch.equal(a, b) for a, b in zip(scores.masks[kind], result.scores.masks[kind]))
    plan = build_plan(scores, PlanSettings(ratio=RATIO, mode="learned", channel_multiple=1))
    for index, layer in enumerate(plan.layers):  # the plan keeps exactly the units whose mask is 1
        for kind in ("gqa_group", "mlp_channel"):
            kept = torch.nonzero(scores.masks[kind][index]).flatten().tolist()
            assert list(layer.kept.get(kind, ())) == kept
        assert layer.removes_layer == (not scores.masks["layer"][index].any())
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad(), deterministic(model, scores):
        reference = model(input_ids=blocks).logits
    with torch.no_grad():
        logits = pruned(input_ids=blocks).logits
    assert torch.allclose(logits, reference, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # the plan records the channel multiple the masks were learned in, not the one it was asked for
    assert (
        build_plan(scores, PlanSettings(ratio=RATIO, mode="learned", channel_multiple=128)).settings.channel_multiple
        == 1
    )
    # another ratio is refused: the masks fix the size
    with pytest.raises(GqaPruneError, match="mode learned reproduces them"):
        build_plan(scores, PlanSettings(ratio=0.5, mode="learned", channel_multiple=1))
    # the other modes still work from the l0 keep-scores (log-alphas) and the dense block influence
    build_plan(scores, PlanSettings(ratio=RATIO, mode="width", channel_multiple=8))


def test_output_folder_has_the_curves_and_is_seeded(learned, tmp_path):
    model, blocks, result = learned
    save_learned(result, tmp_path / "l0")
    rows = (tmp_path / "l0" / "training.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lagrangian,target_ratio,expected_ratio,lambda1,lambda2")
    assert len(rows) == STEPS + 1
    assert (tmp_path / "l0" / "training.png").read_bytes()[:4] == b"\x89PNG"
    again = learn_masks(tiny_model("llama", 3, layers=4), blocks, _settings())
    for kind in ("gqa_group", "mlp_channel"):
        assert all(torch.equal(a, b) for a, b in zip(again.scores.units[kind], result.scores.units[kind]))


@pytest.mark.parametrize("train_weights", ["full", "lora"])
def test_joint_weight_training_saves_weights_that_prune_uses(tmp_path, train_weights):
    if train_weights == "lora":
        pytest.importorskip("peft")
    model = tiny_model("qwen2", 3, layers=4)
    blocks = calibration_ids(96, blocks=8, length=16)
    result = learn_masks(model, blocks, _settings(ratio=0.2, train_weights=train_weights, weight_lr=1e-3))
    save_learned(result, tmp_path / "l0")
    from gqa_prune.sources import load_model

    trained = load_model(tmp_path / "l0" / "model")
    dense = tiny_model("qwen2", 3, layers=4)
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), dense.state_dict().values())]
    assert any(changed)
    scores = stored_scores.load(tmp_path / "l0")
    plan = build_plan(scores, PlanSettings(ratio=0.2, mode="learned", channel_multiple=1))
    pruned = apply_plan(copy.deepcopy(trained), plan)
    with torch.no_grad(), deterministic(trained, scores):
        reference = trained(input_ids=blocks).logits
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=blocks).logits, reference, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_settings_are_refused_before_training():
    model = tiny_model("llama", 3, layers=2)
    blocks = calibration_ids(96, blocks=4, length=8)
    with pytest.raises(GqaPruneError, match="steps 10 < warm-up 20"):
        learn_masks(model, blocks, _settings(steps=10, warmup_steps=20))
    with pytest.raises(GqaPruneError, match="cannot be reached by masks of gqa_group: at most 0.4"):
        learn_masks(model, blocks, _settings(ratio=0.9, kinds=("gqa_group",)))
    with pytest.raises(GqaPruneError, match="unit kind 'heads'"):
        _settings(kinds=("heads",)).validate()


@pytest.fixture
def cli_inputs(tmp_path, tiny_model_dir):
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir))
    save_calibration(tmp_path / "blocks.safetensors", calibration_ids(vocab, blocks=8, length=16), {"seed": 0})
    return tiny_model_dir, tmp_path / "blocks.safetensors"


def test_cli_learns_masks_and_plan_reproduces_them(tmp_path, cli_inputs, capsys):
    model_dir, blocks = cli_inputs
    out = tmp_path / "importance" / "c4-l0-r0.30"
    common = ["--model", str(model_dir), "--calib", str(blocks), "--channel-multiple", "1", "--out", str(out)]
    assert main(["learn-masks", "--ratio", "0.3", "--steps", str(STEPS), "--warmup-steps", "50", *common]) == 0
    assert "learned masks (l0" in capsys.readouterr().out
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--importance", str(out), "--ratio", "0.3", "--channel-multiple", "1",
                 "--out", str(plan_file)]) == 0  # fmt: skip
    assert "plan (learned)" in capsys.readouterr().out
    assert PruningPlan.load(plan_file).settings.weights is None  # frozen weights: any copy of the model will do


def test_prune_takes_the_weights_the_masks_were_learned_with(tmp_path, cli_inputs, capsys):
    model_dir, blocks = cli_inputs
    out = tmp_path / "l0"
    assert main(["learn-masks", "--model", str(model_dir), "--calib", str(blocks), "--ratio", "0.2",
                 "--steps", str(STEPS), "--warmup-steps", "50", "--channel-multiple", "1", "--train-weights", "full",
                 "--weight-lr", "1e-3", "--out", str(out)]) == 0  # fmt: skip
    assert main(["plan", "--importance", str(out), "--ratio", "0.2", "--channel-multiple", "1",
                 "--out", str(tmp_path / "plan.json")]) == 0  # fmt: skip
    assert PruningPlan.load(tmp_path / "plan.json").settings.weights == str((out / "model").resolve())
    capsys.readouterr()
    prune = ["prune", "--plan", str(tmp_path / "plan.json")]
    assert main([*prune, "--model", str(model_dir), "--out", str(tmp_path / "wrong")]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(
        f"plan {str(tmp_path / 'plan.json')!r} keeps units learned together with trained weights: prune those "
        f"(--model {(out / 'model').resolve()}), not {str(model_dir)!r}"
    )
    assert not (tmp_path / "wrong").exists()
    assert main([*prune, "--model", str(out / "model"), "--out", str(tmp_path / "pruned")]) == 0


def test_a_non_finite_loss_stops_at_its_step_and_writes_nothing(tmp_path, cli_inputs, capsys):
    from gqa_prune.sources import load_model

    model_dir, blocks = cli_inputs
    broken = load_model(model_dir)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "broken")
    for file in model_dir.glob("tokenizer*"):
        (tmp_path / "broken" / file.name).write_bytes(file.read_bytes())
    out = tmp_path / "l0"
    code = main(["learn-masks", "--model", str(tmp_path / "broken"), "--calib", str(blocks), "--ratio", "0.3",
                 "--steps", "20", "--warmup-steps", "5", "--channel-multiple", "16", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the loss became nan at step 1; nothing written" in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".l0.tmp-*"))


def test_learn_masks_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, gqa_prune.cli as c; c.build_parser(); assert 'torch' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    assert tuple(KINDS) == UNIT_KINDS  # the light list of unit kinds is the registry's
    assert geometry_of(tiny_model("llama", 3, layers=2)).unit_params() > 0 and as_unit_masks({}) == {}
