"""LoRA recovery on tiny pruned models: it learns, merging is exact, shapes survive."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import calibration_ids, parameter_count, plan_for, tiny_model

from gqa_prune.arch import geometry_of
from gqa_prune.errors import GqaPruneError
from gqa_prune.recovery import RecoverySettings, distillation_loss, lora_model, merge, train
from gqa_prune.surgery import apply_plan

BLOCKS = calibration_ids(blocks=4, length=24, seed=7)  # a small set the adapters can fit


def _pruned(family: str = "llama", heads_per_group: int = 3):
    dense = tiny_model(family, heads_per_group)
    plan = plan_for(dense, protected_layers=(0,))
    return dense, apply_plan(copy.deepcopy(dense), plan), plan


def _mean_lm_loss(model) -> float:
    with torch.no_grad():
        return model(input_ids=BLOCKS, labels=BLOCKS).loss.item()


def _mean_kl(student, teacher) -> float:
    with torch.no_grad():
        return distillation_loss(student(input_ids=BLOCKS).logits, teacher(input_ids=BLOCKS).logits, 1.0).item()


@pytest.mark.parametrize(("family", "heads_per_group"), [("llama", 3), ("qwen3", 4)])
def test_lm_recovery_lowers_the_loss_and_merging_is_exact(family, heads_per_group):
    _, pruned, plan = _pruned(family, heads_per_group)
    before = _mean_lm_loss(pruned)
    parameters = parameter_count(pruned)
    settings = RecoverySettings(loss="lm", rank=8, lr=1e-2, steps=30, batch_size=2, warmup_steps=2, dropout=0.0)
    peft_model = lora_model(pruned, settings)
    history = train(peft_model, BLOCKS, settings)
    with torch.no_grad():
        unmerged = peft_model(input_ids=BLOCKS).logits
    merged = merge(peft_model, settings)
    with torch.no_grad():
        assert (merged(input_ids=BLOCKS).logits - unmerged).abs().max().item() <= 1e-5
    assert _mean_lm_loss(merged) < 0.97 * before  # a clear drop, measured after merging
    assert len(history) == 30 and history[-1].tokens == 30 * 2 * 24
    assert geometry_of(merged) == plan.pruned_geometry() and parameter_count(merged) == parameters
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_distillation_brings_the_student_closer_to_the_teacher():
    dense, pruned, _ = _pruned()
    before = _mean_kl(pruned, dense)
    settings = RecoverySettings(loss="kd", rank=8, lr=1e-2, steps=30, batch_size=2, warmup_steps=2, temperature=1.0)
    peft_model = lora_model(pruned, settings)
    train(peft_model, BLOCKS, settings, teacher=dense)
    assert _mean_kl(merge(peft_model, settings), dense) < 0.8 * before


def test_distillation_loss_is_zero_for_identical_logits_and_scaled_by_t_squared():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    kl_t1 = distillation_loss(logits, other, 1.0).item()
    manual = torch.nn.functional.kl_div(
        torch.log_softmax(logits.view(-1, 11), -1), torch.log_softmax(other.view(-1, 11), -1),
        log_target=True, reduction="batchmean",
    ).item()  # fmt: skip
    assert kl_t1 == pytest.approx(manual, rel=1e-5)


def test_invalid_recovery_settings_are_refused():
    with pytest.raises(GqaPruneError, match="recovery loss 'mse' is not one of lm, kd"):
        RecoverySettings(loss="mse").validate()
    with pytest.raises(GqaPruneError, match="warmup_steps 10 must be in \\[0, steps=10\\)"):
        RecoverySettings(steps=10, warmup_steps=10).validate()
    _, pruned, _ = _pruned()
    with pytest.raises(GqaPruneError, match="the kd loss needs the dense teacher model"):
        train(lora_model(pruned, RecoverySettings(loss="kd")), BLOCKS, RecoverySettings(loss="kd"))


def test_recover_through_the_cli_prints_no_third_party_banner(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    from helpers import calibration_ids, plan_for, tiny_model
    from safetensors.torch import save_file

    from gqa_prune.checkpoint import save_pruned
    from gqa_prune.surgery import apply_plan

    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    plan = plan_for(model, protected_layers=(0,))
    save_pruned(apply_plan(model, plan), tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny")
    save_file({"input_ids": calibration_ids(len(tiny_tokenizer), blocks=4, length=16)}, str(tmp_path / "blocks.st"))
    done = subprocess.run(
        [sys.executable, "-m", "gqa_prune.cli", "recover", "--model", str(tmp_path / "pruned"),
         "--train-blocks", str(tmp_path / "blocks.st"), "--steps", "1", "--warmup-steps", "0",
         "--device", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for noise in ("GPT-QModel", "Python GIL", "Reading global config value", "Failed to load", "is deprecated"):
        assert noise not in done.stdout + done.stderr, noise
