"""The least-squares refit after an expert plan's width removals (`prune --calib` on an expert plan), on tiny
seeded models: it never raises a projection's calibration error, touches nothing a plan does not cut, and the
physically pruned model equals its masked reference with the refit weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import calibration_ids, tiny_moe

from gqa_prune.cli import main
from gqa_prune.data import save_calibration
from gqa_prune.expert_importance import score_experts
from gqa_prune.expert_plan import build_expert_plan
from gqa_prune.expert_reconstruct import refit_expert_plan
from gqa_prune.expert_surgery import apply_expert_plan, masked_experts
from gqa_prune.settings import ExpertPlanSettings

CALIB = calibration_ids(blocks=6, length=24, seed=5)
INPUTS = calibration_ids(blocks=2, length=12, seed=9)


def _plan(model, **settings):
    scores = score_experts(copy.deepcopy(model), CALIB[:4], curves=False)
    return build_expert_plan(scores, ExpertPlanSettings(channel_multiple=4, **settings))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


@pytest.mark.parametrize(("family", "select"), [("qwen2_moe", "obs"), ("gpt_oss", "obs"), ("granitemoehybrid", "plan")])
def test_the_refit_never_raises_an_error_and_the_pruned_model_equals_its_masked_reference(family, select):
    """GQA groups, shared-MLP channels and expert channels cut (gpt-oss: interleaved experts; Granite: a fused
    shared MLP beside Mamba layers), the units chosen by OBS or the plan's."""
    model = tiny_moe(family, intermediate_size=32, moe_intermediate_size=32)
    plan = _plan(model, expert_ratio=0.34, channel_ratio=0.25, width_ratio=0.5)
    refit = copy.deepcopy(model)
    applied, report = refit_expert_plan(refit, plan, CALIB, ridge=0.3, select=select)
    assert (applied == plan) == (select == "plan")  # OBS re-chose some units here
    errors = [(entry["layer"], name, values) for entry in report["layers"] for name, values in entry.items()
              if name != "layer"]  # fmt: skip
    names = {name.split(" ")[0] for _, name, _ in errors}
    assert names == ({"o_proj", "expert"} | ({"shared_output"} if family != "gpt_oss" else set())), names
    assert all(values["refit_error"] <= values["sliced_error"] * (1 + 1e-9) for _, _, values in errors), errors
    assert any(values["refit_error"] < 0.99 * values["sliced_error"] for _, _, values in errors)
    with masked_experts(refit, applied):
        reference = _logits(refit)
    pruned = apply_expert_plan(copy.deepcopy(refit), applied)
    torch.testing.assert_close(_logits(pruned), reference, rtol=0, atol=1e-5)
    with masked_experts(model, applied):  # the refit changed what the pruned model computes
        assert (_logits(model) - reference).abs().max() > 1e-3


def test_a_plan_that_cuts_no_inputs_changes_nothing():
    model = tiny_moe("qwen3_moe")
    plan = _plan(model, expert_ratio=0.5)
    assert not plan.cuts_columns
    refit = copy.deepcopy(model)
    applied, report = refit_expert_plan(refit, plan, CALIB, ridge=0.3)
    assert applied == plan and all(set(entry) == {"layer"} for entry in report["layers"])
    for (name, before), after in zip(model.state_dict().items(), refit.state_dict().values()):
        assert torch.equal(before, after), name


def test_prune_with_calibration_refits_an_expert_plan_and_says_so(tmp_path, tiny_tokenizer, capsys):
    model = tiny_moe("qwen3_moe", vocab_size=len(tiny_tokenizer), moe_intermediate_size=32)
    model.save_pretrained(tmp_path / "moe")
    tiny_tokenizer.save_pretrained(tmp_path / "moe")
    blocks = calibration_ids(len(tiny_tokenizer), blocks=6, length=24, seed=5)
    save_calibration(tmp_path / "calib.safetensors", blocks, {"source": "random"})
    scores = score_experts(copy.deepcopy(model), blocks[:4], curves=False)
    build_expert_plan(scores, ExpertPlanSettings(0.34, channel_ratio=0.25, channel_multiple=4, width_ratio=0.5)).save(
        tmp_path / "plan.json"
    )
    for calib, out in ((["--calib", str(tmp_path / "calib.safetensors")], "refit"), ([], "sliced")):
        code = main(["prune", "--model", str(tmp_path / "moe"), "--plan", str(tmp_path / "plan.json"),
                     "--out", str(tmp_path / out), *calib])  # fmt: skip
        assert code == 0
    build_expert_plan(scores, ExpertPlanSettings(0.34)).save(tmp_path / "experts-only.json")
    code = main(["prune", "--model", str(tmp_path / "moe"), "--plan", str(tmp_path / "experts-only.json"),
                 "--out", str(tmp_path / "experts-only"), "--calib", str(tmp_path / "calib.safetensors")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert "refitted by least squares" in printed[0] and "; no reconstruction)" in printed[1], printed
    assert "no reconstruction: the plan cuts no projection's inputs)" in printed[2], printed
    record = json.loads((tmp_path / "refit" / "gqa_prune.json").read_text())
    assert record["reconstruction"]["calibration_tokens"] == blocks.numel()
    assert "## Reconstruction" in (tmp_path / "refit" / "README.md").read_text()
    refit_weights = (tmp_path / "refit" / "model.safetensors").read_bytes()
    assert refit_weights != (tmp_path / "sliced" / "model.safetensors").read_bytes()
