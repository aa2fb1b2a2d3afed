"""The CLI end to end on a tiny model, and bad input: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_SHARD, DATA_DIR
from helpers import tiny_model
from safetensors.torch import load_file

from gqa_prune.cli import main, parse_layer_list
from gqa_prune.planning import PruningPlan


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], err


@pytest.fixture
def scored(tmp_path, tiny_model_dir, capsys):
    """calib + importance on the tiny model; returns the work folder."""
    assert (
        run(
            capsys,
            "calib",
            "--model",
            str(tiny_model_dir),
            "--source",
            str(C4_SHARD),
            "--n-samples",
            "8",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "calib.safetensors"),
        )[0]
        == 0
    )
    assert (
        run(
            capsys,
            "importance",
            "--model",
            str(tiny_model_dir),
            "--calib",
            str(tmp_path / "calib.safetensors"),
            "--criterion",
            "taylor",
            "--layer-criteria",
            "block_influence,removal",
            "--channel-multiple",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "importance"),
        )[0]
        == 0
    )
    return tmp_path


def test_stage_calib_importance_plan_prune_ppl(tmp_path, tiny_model_dir, scored, capsys):
    code, out, _ = run(capsys, "stage", "--source", str(tiny_model_dir), "--out", str(tmp_path / "staged"))
    assert code == 0 and (tmp_path / "staged" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "staged" / "gqa_prune.json").read_text())["kind"] == "local"

    record = json.loads((scored / "importance" / "scores.json").read_text())
    assert set(record["structural"]) == {"block_influence", "removal"}
    assert set(record["structural"]["removal"]) == {"layer", "attn_sublayer", "mlp_sublayer"}
    assert load_file(str(scored / "importance" / "units.safetensors"))["gqa_group.0"].shape == (4,)

    code, out, _ = run(
        capsys,
        "plan",
        "--importance",
        str(scored / "importance"),
        "--ratio",
        "0.3",
        "--layer-criterion",
        "removal",
        "--channel-multiple",
        "8",
        "--protect",
        "0",
        "--out",
        str(tmp_path / "plan.json"),
        "--plot",
        str(tmp_path / "plan.png"),
    )
    assert code == 0 and "plan (hybrid): remove" in out  # the default mode
    plan = PruningPlan.load(tmp_path / "plan.json")
    assert plan.settings.layer_criterion == "removal" and plan.settings.protected_layers == (0,)
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"

    code, out, _ = run(
        capsys,
        "prune",
        "--model",
        str(tmp_path / "staged"),
        "--plan",
        str(tmp_path / "plan.json"),
        "--out",
        str(tmp_path / "pruned"),
    )
    assert code == 0 and f"-> {plan.params_after:,} parameters" in out

    code, out, _ = run(
        capsys,
        "ppl",
        "--model",
        str(tmp_path / "pruned"),
        "--data-dir",
        str(DATA_DIR),
        "--window",
        "32",
        "--max-tokens",
        "320",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ppl.json"),
    )
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert code == 0 and record["windows"] == 10 and record["tokens_scored"] == 310 and record["window"] == 32
    assert "GPTQ-style" in record["text"] and "10 windows x 32 tokens" in out

    code, out, _ = run(capsys, "plot", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "again.png"))
    assert code == 0 and (tmp_path / "again.png").is_file()
    assert not [path for path in tmp_path.rglob("*") if ".tmp-" in path.name]


def test_prune_with_calibration_records_the_units_obs_chose(tmp_path, tiny_model_dir, scored, capsys):
    plan_path = tmp_path / "plan.json"
    argv = ["--importance", str(scored / "importance"), "--ratio", "0.3", "--channel-multiple", "8"]
    assert run(capsys, "plan", *argv, "--mode", "width", "--out", str(plan_path))[0] == 0
    plan = PruningPlan.load(plan_path)
    kept = {}
    for select in ("obs", "plan"):
        out_dir = tmp_path / f"pruned-{select}"
        code, out, _ = run(
            capsys, "prune", "--model", str(tiny_model_dir), "--plan", str(plan_path), "--calib",
            str(scored / "calib.safetensors"), "--select", select, "--out", str(out_dir),
        )  # fmt: skip
        assert code == 0 and "refitted by least squares" in out
        recorded = PruningPlan.load(out_dir / "pruning_plan.json")
        assert [{k: len(v) for k, v in layer.kept.items()} for layer in recorded.layers] == [
            {k: len(v) for k, v in layer.kept.items()} for layer in plan.layers
        ]
        state = load_file(str(out_dir / "model.safetensors"))
        for layer in recorded.layers:  # the checkpoint holds exactly the recorded units' weights
            assert state[f"model.layers.{layer.layer}.mlp.down_proj.weight"].shape[1] == len(layer.kept_mlp_channels)
        card = (out_dir / "README.md").read_text()
        assert ("chosen by greedy structured OBS" in card) == (select == "obs")
        provenance = json.loads((out_dir / "gqa_prune.json").read_text())
        assert provenance["reconstruction"]["settings"]["select"] == select
        kept[select] = recorded
    assert kept["plan"].layers == plan.layers and kept["obs"].layers != plan.layers


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "gqa_prune.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "importance" in done.stdout
    script = Path(sys.executable).parent / "gqa-prune"  # the console script installed beside this interpreter
    entry = subprocess.run([str(script), "plan", "--help"], capture_output=True, text=True)
    assert entry.returncode == 0 and "--channel-multiple" in entry.stdout


def test_unknown_architecture_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "stage", "--source", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2': gqa-prune supports llama, mistral, qwen2, qwen3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["1.5", "1", "-0.2", "abc"])
def test_ratio_outside_unit_interval_is_refused(tmp_path, scored, capsys, ratio):
    code, _, err = run(
        capsys, "plan", "--importance", str(scored / "importance"), "--ratio", ratio, "--out", str(tmp_path / "p.json")
    )
    assert_one_line_error(code, err, "argument --ratio:")
    assert not (tmp_path / "p.json").exists()


def test_plan_that_would_empty_a_layer_is_refused(tmp_path, tiny_model_dir, scored, capsys):
    run(
        capsys,
        "plan",
        "--importance",
        str(scored / "importance"),
        "--ratio",
        "0.2",
        "--mode",
        "width",
        "--channel-multiple",
        "8",
        "--out",
        str(tmp_path / "plan.json"),
    )
    data = json.loads((tmp_path / "plan.json").read_text())
    data["layers"][1]["kept"]["gqa_group"] = []
    (tmp_path / "plan.json").write_text(json.dumps(data))
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        str(tiny_model_dir),
        "--plan",
        str(tmp_path / "plan.json"),
        "--out",
        str(tmp_path / "pruned"),
    )
    assert_one_line_error(code, err, "layer 1: kept gqa_group is empty")
    assert not (tmp_path / "pruned").exists()
    code, _, err = run(
        capsys,
        "plan",
        "--importance",
        str(scored / "importance"),
        "--ratio",
        "0.9",
        "--mode",
        "width",
        "--max-rate",
        "0.5",
        "--out",
        str(tmp_path / "too-much.json"),
    )
    assert_one_line_error(code, err, "attention ratio 0.9 is infeasible")
    assert not (tmp_path / "too-much.json").exists()


def test_calibration_text_shorter_than_asked_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "short.txt").write_text("only a few words here\n")
    code, _, err = run(
        capsys,
        "calib",
        "--model",
        str(tiny_model_dir),
        "--source",
        str(tmp_path / "short.txt"),
        "--n-samples",
        "4",
        "--seq-len",
        "64",
        "--out",
        str(tmp_path / "calib.safetensors"),
    )
    assert_one_line_error(code, err, "blocks x 64 tokens need 256")
    assert not (tmp_path / "calib.safetensors").exists()


def test_missing_model_path_is_refused(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "calib",
        "--model",
        str(tmp_path / "nowhere"),
        "--source",
        str(C4_SHARD),
        "--out",
        str(tmp_path / "calib.safetensors"),
    )
    assert_one_line_error(code, err, f"model path '{tmp_path / 'nowhere'}' does not exist")
    code, _, err = run(capsys, "stage", "--source", "./no/such/model", "--out", str(tmp_path / "m"))
    assert_one_line_error(code, err, "model source './no/such/model' does not exist")
    assert not list(tmp_path.iterdir())


def test_nan_scores_are_refused(tmp_path, tiny_tokenizer, scored, capsys):
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[3, 3] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    tiny_tokenizer.save_pretrained(tmp_path / "broken")
    code, _, err = run(
        capsys,
        "importance",
        "--model",
        str(tmp_path / "broken"),
        "--calib",
        str(scored / "calib.safetensors"),
        "--criterion",
        "magnitude",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "scores"),
    )
    assert_one_line_error(code, err, "contain NaN/Inf")
    assert not (tmp_path / "scores").exists()


def test_layer_lists():
    assert parse_layer_list("0,1,28-29") == (0, 1, 28, 29)
    assert parse_layer_list("") == ()


@pytest.mark.parametrize("mode", ["depth", "hybrid"])
def test_plan_modes_through_the_cli(tmp_path, tiny_model_dir, scored, capsys, mode):
    plan_file = tmp_path / f"{mode}.json"
    code, out, err = run(
        capsys, "plan", "--importance", str(scored / "importance"), "--ratio", "0.3", "--mode", mode,
        "--channel-multiple", "8", "--out", str(plan_file), "--plot", str(tmp_path / f"{mode}.png"),
    )  # fmt: skip
    assert code == 0, err
    assert f"plan ({mode}): remove" in out and "sublayers removed" in out
    plan = PruningPlan.load(plan_file)
    assert plan.settings.mode == mode and (tmp_path / f"{mode}.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(
        capsys, "prune", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(tmp_path / mode)
    )
    assert code == 0 and f"-> {plan.params_after:,} parameters" in out


def test_hand_split_with_a_non_width_mode_is_one_line_refusal(tmp_path, scored, capsys):
    code, _, err = run(
        capsys, "plan", "--importance", str(scored / "importance"), "--ratio", "0.3", "--mode", "hybrid",
        "--attn-ratio", "0.1", "--out", str(tmp_path / "plan.json"),
    )  # fmt: skip
    assert_one_line_error(code, err, "--attn-ratio/--mlp-ratio set a hand split and apply to --mode width only")
    assert not (tmp_path / "plan.json").exists()


def test_command_line_choices_are_the_registries():
    from gqa_prune import choices
    from gqa_prune.criteria import STRUCTURAL_CRITERIA, UNIT_CRITERIA
    from gqa_prune.criteria.experts import EXPERT_CRITERIA
    from gqa_prune.export.gguf import FLOAT_TYPES, QUANTIZED_TYPES
    from gqa_prune.sources import DEVICES, DTYPES

    assert set(FLOAT_TYPES) | set(QUANTIZED_TYPES) == set(choices.GGUF_TYPES)
    assert tuple(UNIT_CRITERIA) == choices.UNIT_CRITERIA
    assert tuple(EXPERT_CRITERIA) == choices.EXPERT_CRITERIA
    assert tuple(STRUCTURAL_CRITERIA) == choices.LAYER_CRITERIA
    assert tuple(DTYPES) == choices.DTYPES and tuple(DEVICES) == choices.DEVICES


def test_import_is_light_and_registers_once_transformers_arrives():
    code = (
        "import sys, gqa_prune; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
        "assert 'gqa_pruned_llama' in CONFIG_MAPPING; "
        "import gqa_prune.cli as cli; cli.build_parser(); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    code = "import sys, gqa_prune.cli as cli; cli.build_parser(); assert 'torch' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(("module", "extra"), [("peft", "recover"), ("lm_eval", "eval"), ("gptqmodel", "quantize")])
def test_a_missing_optional_package_is_one_line_naming_its_extra(monkeypatch, module, extra):
    from gqa_prune.errors import GqaPruneError, require

    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
    with pytest.raises(GqaPruneError, match=rf"needs the optional package .*pip install 'gqa-prune\[{extra}\]'"):
        require(module, extra, "this stage")
