"""The bad-input corpus: every case through the CLI, each answered with exit status 2, one line on stderr that
names the bad value, and nothing written at the output path (nor anything that existed there removed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import C4_SHARD, DATA_DIR
from helpers import parameter_count, plan_for, scores_for, tiny_model
from safetensors.torch import save_file
from test_cli import assert_one_line_error, run

from gqa_prune import scores as stored_scores
from gqa_prune.plan import PlanSettings, build_plan


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny model, calibration blocks, scores, a width plan and a depth plan, made once."""
    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    (root / "model" / "gqa_prune.json").write_text('{"source": "org/tiny"}')
    blocks = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": blocks}, str(root / "calib.safetensors"))
    save_file({"input_ids": torch.full((2, 32), 500)}, str(root / "foreign-calib.safetensors"))
    stored_scores.save(scores_for(model), root / "importance")
    plan_for(model).save(root / "plan.json")
    five = tiny_model("llama", 3, layers=5)
    build_plan(scores_for(five), PlanSettings(ratio=0.4, mode="depth"), parameter_count(five)).save(root / "depth.json")
    (root / "bad-utf8.txt").write_bytes(b"caf\xe9 au lait\n\nsecond document\n")
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "typed.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (root / "fieldless.jsonl").write_text('{"body": "no text field"}\n')
    (root / "notes.txt").write_text("not a calibration file")
    return root


def _plan_with(workspace: Path, name: str, edit) -> Path:
    data = json.loads((workspace / "plan.json").read_text())
    edit(data)
    path = workspace / name
    path.write_text(json.dumps(data))
    return path


def _model_with(workspace: Path, name: str, edit) -> Path:
    folder = workspace / name
    if not folder.exists():
        shutil.copytree(workspace / "model", folder)
        edit(folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _bad_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _inconsistent_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80  # the weights are 64 wide
    (folder / "config.json").write_text(json.dumps(config))


def _mixed_importance(workspace: Path) -> Path:
    folder = workspace / "mixed-importance"
    if not folder.exists():
        shutil.copytree(workspace / "importance", folder)
        other = scores_for(tiny_model("llama", 3, layers=4))
        stored_scores.save(other, workspace / "other-importance")
        shutil.copy(workspace / "other-importance" / "scores.json", folder / "scores.json")
    return folder


def _short_importance(workspace: Path) -> Path:
    folder = workspace / "short-importance"
    if not folder.exists():
        shutil.copytree(workspace / "importance", folder)
        record = json.loads((folder / "scores.json").read_text())
        record["structural"]["block_influence"]["layer"] = record["structural"]["block_influence"]["layer"][:2]
        (folder / "scores.json").write_text(json.dumps(record))
    return folder


# (case id, argv builder(workspace, out) -> list of str, the value-naming text the error line must contain)
CASES = [
    # outputs
    ("calib --out is a directory", lambda w, o: ["calib", "--model", w / "model", "--source", C4_SHARD, "--out", w], "is an existing directory"),
    ("plan --out is a directory", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--out", w], "is an existing directory"),
    ("importance --out is a file", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "calib.safetensors", "--out", w / "notes.txt"], "is an existing file"),
    ("prune --out is a foreign folder", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--out", DATA_DIR], "did not write"),
    ("ppl --out under a file", lambda w, o: ["ppl", "--model", w / "model", "--data-dir", DATA_DIR, "--out", w / "notes.txt" / "ppl.json"], "is a file"),
    ("plot --out is a directory", lambda w, o: ["plot", "--plan", w / "plan.json", "--out", w], "is an existing directory"),
    # edited plans
    ("float group indices", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p1.json", lambda d: d["layers"][1]["kept"].update(gqa_group=[0.2, 0.7, 2.0])), "--out", o], "must be a list of integer indices"),
    ("half-integer channel indices", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p2.json", lambda d: d["layers"][0]["kept"].update(mlp_channel=[0.5, 1.5, 2.5])), "--out", o], "must be a list of integer indices"),
    ("boolean indices", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p3.json", lambda d: d["layers"][2]["kept"].update(gqa_group=[True, 2])), "--out", o], "must be a list of integer indices"),
    ("index out of range", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p4.json", lambda d: d["layers"][2]["kept"].update(gqa_group=[0, 9])), "--out", o], "kept gqa_group must be sorted, unique indices in 0..3"),
    ("unknown removed kind", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p5.json", lambda d: d["layers"][1].update(removed=["head"])), "--out", o], "cannot remove 'head'"),
    ("unknown kept kind", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p6.json", lambda d: d["layers"][1]["kept"].update(expert=[0])), "--out", o], "unknown unit kind 'expert'"),
    ("plan is not JSON", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "notes.txt", "--out", o], "is malformed"),
    ("plan of another format", lambda w, o: ["prune", "--model", w / "model", "--plan", _plan_with(w, "p7.json", lambda d: d.update(version=9)), "--out", o], "version 9"),
    ("depth plan for another depth", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "depth.json", "--out", o], "the plan is for 5 layers, the model has 3"),
    # plan settings
    ("empty protect range", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--protect", "2-0", "--out", o], "layer range '2-0'"),
    ("protect a layer that does not exist", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--protect", "99", "--out", o], "protected layer 99 does not exist"),
    ("channel multiple wider than the MLP", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--channel-multiple", "1000", "--out", o], "channel_multiple 1000"),
    ("ratio not a number", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "nan", "--out", o], "ratio nan is outside [0, 1)"),
    ("ratio above one", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "1.5", "--out", o], "1.5"),
    ("min rate above max rate", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--min-rate", "0.6", "--max-rate", "0.5", "--out", o], "min_rate=0.6, max_rate=0.5"),
    ("hand split in hybrid mode", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--mode", "hybrid", "--mlp-ratio", "0.3", "--out", o], "--attn-ratio/--mlp-ratio"),
    ("depth with every layer protected", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--mode", "depth", "--protect", "0-2", "--out", o], "mode depth cannot reach ratio 0.2"),
    ("layer criterion not computed", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--layer-criterion", "removal", "--out", o], "'removal' was not computed"),
    ("importance mixing two models", lambda w, o: ["plan", "--importance", _mixed_importance(w), "--ratio", "0.2", "--out", o], "gqa_group scores cover 3 layers but the model has 4"),
    ("importance with a short layer-score list", lambda w, o: ["plan", "--importance", _short_importance(w), "--ratio", "0.2", "--out", o], "block_influence layer cover 2 layers"),
    ("importance folder missing", lambda w, o: ["plan", "--importance", w / "nowhere", "--ratio", "0.2", "--out", o], "lacks units.safetensors"),
    # sequence lengths
    ("calib seq-len beyond the model", lambda w, o: ["calib", "--model", w / "model", "--source", C4_SHARD, "--seq-len", "4096", "--out", o], "--seq-len 4096 exceeds the model's 128 positions"),
    ("ppl window beyond the model", lambda w, o: ["ppl", "--model", w / "model", "--data-dir", DATA_DIR, "--window", "4096", "--out", o], "--window 4096 exceeds the model's 128 positions"),
    ("evaluate max-length beyond the model", lambda w, o: ["evaluate", "--model", w / "model", "--tasks", "piqa=2", "--data-dir", DATA_DIR, "--max-length", "4096", "--out", o], "--max-length 4096 exceeds"),
    ("evaluate names no task", lambda w, o: ["evaluate", "--model", w / "model", "--tasks", ",", "--out", o], "names no task"),
    ("evaluate unknown task", lambda w, o: ["evaluate", "--model", w / "model", "--tasks", "mmlu", "--out", o], "task 'mmlu' is not one of"),
    # broken model folders
    ("truncated weights: stage", lambda w, o: ["stage", "--source", _model_with(w, "truncated", _truncate), "--out", o], "cannot load model"),
    ("truncated weights: importance", lambda w, o: ["importance", "--model", _model_with(w, "truncated", _truncate), "--calib", w / "calib.safetensors", "--device", "cpu", "--out", o], "cannot load model folder"),
    ("truncated weights: prune", lambda w, o: ["prune", "--model", _model_with(w, "truncated", _truncate), "--plan", w / "plan.json", "--out", o], "cannot load model folder"),
    ("truncated weights: ppl", lambda w, o: ["ppl", "--model", _model_with(w, "truncated", _truncate), "--data-dir", DATA_DIR, "--device", "cpu", "--out", o], "cannot load model folder"),
    ("truncated weights: quantize", lambda w, o: ["quantize", "--model", _model_with(w, "truncated", _truncate), "--method", "rtn", "--bits", "8", "--group-size", "16", "--out", o], "not a readable safetensors file"),
    ("malformed config: importance", lambda w, o: ["importance", "--model", _model_with(w, "bad-config", _bad_config), "--calib", w / "calib.safetensors", "--out", o], "not a valid JSON object"),
    ("malformed config: calib", lambda w, o: ["calib", "--model", _model_with(w, "bad-config", _bad_config), "--source", C4_SHARD, "--out", o], "not a valid JSON object"),
    ("config inconsistent with the weights", lambda w, o: ["importance", "--model", _model_with(w, "inconsistent", _inconsistent_config), "--calib", w / "calib.safetensors", "--device", "cpu", "--out", o], "cannot load model folder"),
    # calibration data
    ("calibration text not UTF-8", lambda w, o: ["calib", "--model", w / "model", "--source", w / "bad-utf8.txt", "--seq-len", "32", "--out", o], "not UTF-8 text"),
    ("malformed jsonl row", lambda w, o: ["calib", "--model", w / "model", "--source", w / "broken.jsonl", "--seq-len", "32", "--out", o], "line 2 is not a JSON object"),
    ("wrongly typed jsonl row", lambda w, o: ["calib", "--model", w / "model", "--source", w / "typed.jsonl", "--seq-len", "32", "--out", o], "row 2 field 'text' is int, expected text"),
    ("jsonl rows without the text field", lambda w, o: ["calib", "--model", w / "model", "--source", w / "fieldless.jsonl", "--seq-len", "32", "--out", o], "row 1 has no field 'text'"),
    ("evaluation text as calibration", lambda w, o: ["calib", "--model", w / "model", "--source", DATA_DIR / "wikitext-2-raw" / "wiki.test.raw", "--data-dir", DATA_DIR, "--out", o], "is evaluation text"),
    ("--calib is not a calibration file", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "notes.txt", "--out", o], "not a calibration file"),
    ("--calib is a model's weights", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--calib", w / "model" / "model.safetensors", "--out", o], "not a calibration file"),
    ("--calib from another tokenizer", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--calib", w / "foreign-calib.safetensors", "--out", o], "calibration token id 500 >= vocab size"),
    ("reconstruction ridge zero", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--calib", w / "calib.safetensors", "--ridge", "0", "--out", o], "ridge 0.0 must be a finite number > 0"),
    # quantization
    ("3 bits on widths that are not multiples of 32", lambda w, o: ["quantize", "--model", w / "model", "--method", "rtn", "--bits", "3", "--group-size", "16", "--kernel", "torch", "--out", o], "bits 3 packs 32 weights at a time"),
    ("group size that divides no width", lambda w, o: ["quantize", "--model", w / "model", "--method", "rtn", "--bits", "4", "--group-size", "128", "--out", o], "group size 128 does not divide in_features"),
    ("gptq without calibration", lambda w, o: ["quantize", "--model", w / "model", "--method", "gptq", "--bits", "4", "--group-size", "16", "--kernel", "torch", "--out", o], "needs --calib"),
    # recovery, sources
    ("distillation without a teacher", lambda w, o: ["recover", "--model", w / "model", "--train-blocks", w / "calib.safetensors", "--loss", "kd", "--out", o], "--loss kd needs --teacher"),
    ("model source that does not exist", lambda w, o: ["stage", "--source", w / "no-such-model", "--out", o], "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "expected"), CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, capsys, case, argv, expected):
    out = tmp_path / "out"
    arguments = [str(part) for part in argv(workspace, out)]
    before = sorted(str(path) for path in workspace.rglob("*"))
    code, _, err = run(capsys, *arguments)
    assert_one_line_error(code, err, expected)
    assert not out.exists() and not list(tmp_path.iterdir())
    after = sorted(str(path) for path in workspace.rglob("*"))
    assert set(before) <= set(after), "something that existed was removed"
    assert not [path for path in after if ".tmp-" in path]


def test_the_corpus_holds_at_least_forty_distinct_cases():
    assert len({case for case, _, _ in CASES}) == len(CASES) >= 40
