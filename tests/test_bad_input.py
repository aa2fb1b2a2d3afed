"""The bad-input corpus: every case through the CLI, each answered with exit status 2, one line on stderr that
names the bad value, and nothing written at the output path (nor anything that existed there removed)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_SHARD, DATA_DIR
from helpers import parameter_count, plan_for, scores_for, tiny_config, tiny_model, tiny_moe
from safetensors.torch import save_file
from test_cli import assert_one_line_error, run
from transformers import LlamaForCausalLM, PhimoeConfig, PhimoeForCausalLM

from gqa_prune import expert_scores
from gqa_prune import scores as stored_scores
from gqa_prune.atomic import atomic_dir, write_json
from gqa_prune.checkpoint import save_pruned
from gqa_prune.data import save_calibration
from gqa_prune.expert_importance import score_experts
from gqa_prune.expert_plan import build_expert_plan
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.report import PARETO_FRONTS
from gqa_prune.settings import ExpertPlanSettings
from gqa_prune.surgery import apply_plan


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny model, calibration blocks, scores, plans, and the outputs of other sub-commands, made once."""
    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    (root / "model" / "gqa_prune.json").write_text('{"source": "org/tiny"}')
    blocks = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    save_calibration(root / "calib.safetensors", blocks, {"source": "random"})
    save_calibration(root / "calib-folder" / "calib.safetensors", blocks, {"source": "random"})
    save_file({"input_ids": torch.full((2, 32), 500)}, str(root / "foreign-calib.safetensors"))
    save_calibration(root / "negative-calib.safetensors", blocks - 3, {"source": "edited"})
    save_calibration(root / "long-calib.safetensors", blocks.repeat(1, 5), {"source": "too long"})
    save_calibration(root / "short-calib.safetensors", blocks[:, :2], {"source": "2 tokens"})
    save_calibration(root / "one-token-calib.safetensors", blocks[:, :1], {"source": "1 token"})
    stored_scores.save(scores_for(model), root / "importance")
    plan = plan_for(model)
    plan.save(root / "plan.json")
    save_pruned(apply_plan(copy.deepcopy(model), plan), tiny_tokenizer, plan, root / "pruned", source="org/tiny")
    with atomic_dir(root / "learned", "learn-masks") as folder:  # an importance folder of learn-masks
        stored_scores.write_files(scores_for(model), folder)
    write_json(root / "ppl.json", {"perplexity": 2.0, "window": 32, "tokens_scored": 31}, "ppl")
    five = tiny_model("llama", 3, layers=5)
    build_plan(scores_for(five), PlanSettings(ratio=0.4, mode="depth"), parameter_count(five)).save(root / "depth.json")
    tied_config = tiny_config("llama", 3, vocab_size=len(tiny_tokenizer))
    tied_config.tie_word_embeddings = True  # the plan's model, but with one embedding matrix for input and output
    LlamaForCausalLM(tied_config).save_pretrained(root / "tied")
    tiny_tokenizer.save_pretrained(root / "tied")
    qwen2, mistral = tiny_model("qwen2", 3), tiny_model("mistral", 3)  # the same shapes, another family
    plan_for(qwen2).save(root / "qwen2-plan.json")
    mistral.save_pretrained(root / "mistral")
    tiny_tokenizer.save_pretrained(root / "mistral")
    moe = tiny_moe("mixtral", vocab_size=len(tiny_tokenizer))  # experts: 3 MoE layers of 6, top-2
    moe.save_pretrained(root / "moe")
    tiny_tokenizer.save_pretrained(root / "moe")
    tiny_moe("gpt_oss", vocab_size=len(tiny_tokenizer)).save_pretrained(root / "gpt-oss")
    tiny_tokenizer.save_pretrained(root / "gpt-oss")
    moe_scores = score_experts(copy.deepcopy(moe), blocks[:2])
    expert_scores.save(moe_scores, root / "moe-importance")
    build_expert_plan(moe_scores, ExpertPlanSettings(0.5)).save(root / "moe-plan.json")
    build_expert_plan(moe_scores, ExpertPlanSettings(0.5, width_ratio=0.5)).save(root / "moe-width-plan.json")
    PhimoeForCausalLM(PhimoeConfig(**_TINY_PHIMOE, vocab_size=len(tiny_tokenizer))).save_pretrained(root / "phimoe")
    tiny_tokenizer.save_pretrained(root / "phimoe")
    (root / "bad-utf8.txt").write_bytes(b"caf\xe9 au lait\n\nsecond document\n")
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "typed.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (root / "fieldless.jsonl").write_text('{"body": "no text field"}\n')
    (root / "notes.txt").write_text("not a calibration file")
    (root / "user.gguf").write_text("a user's file that happens to end in .gguf")
    (root / "user-table.csv").write_text("variant,ppl\nmine,1.0\n")
    (root / "user-plots").mkdir()
    (root / "user-plots" / f"pareto_{next(iter(PARETO_FRONTS))}.png").write_bytes(b"a user's picture")
    (root / "corrupt-ppl.json").write_text('{"perplexity": ')
    (root / "empty-ppl.json").write_text("{}")
    return root


_TINY_PHIMOE = {
    "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
}  # fmt: skip


def _plan_with(workspace: Path, name: str, edit, source: str = "plan.json") -> Path:
    data = json.loads((workspace / source).read_text())
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


def _importance_with(workspace: Path, name: str, edit) -> Path:
    """A copy of the importance folder with its loss curves edited (``edit(curves)``, kind -> points)."""
    folder = workspace / name
    if not folder.exists():
        shutil.copytree(workspace / "importance", folder)
        record = json.loads((folder / "scores.json").read_text())
        edit({kind: curve["points"] for kind, curve in record["curves"].items()})
        (folder / "scores.json").write_text(json.dumps(record))
    return folder


def _first_curve(edit):
    def apply(curves: dict) -> None:
        edit(curves[sorted(curves)[0]])

    return apply


def _manifest(workspace: Path, **entry) -> str:
    """An inline aggregate manifest of one variant (the model folder, plus ``entry``)."""
    return json.dumps({"model": "tiny", "variants": [{"variant": "dense", "model": str(workspace / "model"), **entry}]})


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
    ("calib --out is a directory", lambda w, o: ["calib", "--model", w / "model", "--source", C4_SHARD, "--out", w / "user-plots"], "is an existing directory"),
    ("plan --out is a directory", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--out", w / "user-plots"], "is an existing directory"),
    ("importance --out is a file", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "calib.safetensors", "--out", w / "notes.txt"], "is an existing file"),
    ("prune --out is a foreign folder", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--out", DATA_DIR], "did not write"),
    ("ppl --out under a file", lambda w, o: ["ppl", "--model", w / "model", "--data-dir", DATA_DIR, "--out", w / "notes.txt" / "ppl.json"], "is a file"),
    ("plot --out is a directory", lambda w, o: ["plot", "--plan", w / "plan.json", "--out", w / "user-plots"], "is an existing directory"),
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
    # outputs replace only their own kind, and never an input
    ("importance --out a pruned checkpoint", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "calib.safetensors", "--out", w / "pruned"], "holds the output of `gqa-prune prune`"),
    ("learn-masks --out a pruned checkpoint", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--out", w / "pruned"], "holds the output of `gqa-prune prune`"),
    ("importance --out a learn-masks folder", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "calib.safetensors", "--out", w / "learned"], "holds the output of `gqa-prune learn-masks`"),
    ("prune --out an importance folder", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--out", w / "importance"], "holds the output of `gqa-prune importance`"),
    ("stage --out a pruned checkpoint", lambda w, o: ["stage", "--source", w / "model", "--out", w / "pruned"], "holds the output of `gqa-prune prune`"),
    ("recover --out a pruned checkpoint", lambda w, o: ["recover", "--model", w / "model", "--train-blocks", w / "calib.safetensors", "--out", w / "pruned"], "holds the output of `gqa-prune prune`"),
    ("quantize --out a learn-masks folder", lambda w, o: ["quantize", "--model", w / "pruned", "--method", "rtn", "--bits", "8", "--group-size", "16", "--out", w / "learned"], "holds the output of `gqa-prune learn-masks`"),
    ("prune --out its own --model", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--out", w / "model"], "is the input --model"),
    ("prune --out the folder holding --model", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--out", w], "contains the input --model"),
    ("importance --out the folder of --calib", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "calib-folder" / "calib.safetensors", "--out", w / "calib-folder"], "contains the input --calib"),
    ("recover --out the folder of --train-blocks", lambda w, o: ["recover", "--model", w / "pruned", "--train-blocks", w / "calib-folder" / "calib.safetensors", "--out", w / "calib-folder"], "contains the input --train-blocks"),
    ("learn-masks --out its own --model", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--out", w / "model"], "is the input --model"),
    ("stage --out its own --source", lambda w, o: ["stage", "--source", w / "model", "--out", w / "model"], "is the input --source"),
    ("quantize --out its own --model", lambda w, o: ["quantize", "--model", w / "pruned", "--method", "rtn", "--bits", "8", "--group-size", "16", "--out", w / "pruned"], "is the input --model"),
    ("plan --out its own --importance", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--out", w / "importance"], "is the input --importance"),
    ("calib --out over the model's weights", lambda w, o: ["calib", "--model", w / "model", "--source", C4_SHARD, "--out", w / "model" / "model.safetensors"], "is an existing file that gqa-prune did not write"),
    ("calib --out over a ppl result", lambda w, o: ["calib", "--model", w / "model", "--source", C4_SHARD, "--out", w / "ppl.json"], "holds the output of `gqa-prune ppl`"),
    ("plan --out over a ppl result", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--out", w / "ppl.json"], "holds the output of `gqa-prune ppl`"),
    ("plan --plot over a plan", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--out", o, "--plot", w / "plan.json"], "holds the output of `gqa-prune plan`"),
    ("ppl --out over a plan", lambda w, o: ["ppl", "--model", w / "model", "--data-dir", DATA_DIR, "--out", w / "plan.json"], "holds the output of `gqa-prune plan`"),
    ("evaluate --out over a ppl result", lambda w, o: ["evaluate", "--model", w / "model", "--tasks", "piqa=2", "--out", w / "ppl.json"], "holds the output of `gqa-prune ppl`"),
    ("efficiency --out over calibration blocks", lambda w, o: ["efficiency", "--model", w / "model", "--out", w / "calib.safetensors"], "holds the output of `gqa-prune calib`"),
    ("plot --out over a ppl result", lambda w, o: ["plot", "--plan", w / "plan.json", "--out", w / "ppl.json"], "holds the output of `gqa-prune ppl`"),
    ("export-gguf --out over a user's file", lambda w, o: ["export-gguf", "--model", w / "model", "--out", w / "user.gguf"], "is an existing file that gqa-prune did not write"),
    ("export-gguf --out without .gguf", lambda w, o: ["export-gguf", "--model", w / "model", "--out", o], "must end in .gguf"),
    ("aggregate --csv over a user's table", lambda w, o: ["aggregate", "--manifest", _manifest(w, ppl=str(w / "ppl.json")), "--csv", w / "user-table.csv"], "is an existing file that gqa-prune did not write"),
    ("aggregate beside a user's plot", lambda w, o: ["aggregate", "--manifest", _manifest(w, ppl=str(w / "ppl.json")), "--csv", w / "user-plots" / "table.csv"], "pareto_"),
    # plans checked against the model
    ("plan of an untied model on its tied twin", lambda w, o: ["prune", "--model", w / "tied", "--plan", w / "plan.json", "--out", o], "this model ties its input and output embeddings"),
    ("same-shape plan of another family", lambda w, o: ["prune", "--model", w / "mistral", "--plan", w / "qwen2-plan.json", "--calib", w / "calib.safetensors", "--out", o], "plan family=qwen2, model family=mistral"),
    # loss curves trusted only when well-formed
    ("loss curve of NaN", lambda w, o: ["plan", "--importance", _importance_with(w, "nan-curve", _first_curve(lambda points: points[0].__setitem__(1, float("nan")))), "--ratio", "0.2", "--out", o], "is not a finite number"),
    ("loss curve of -inf", lambda w, o: ["plan", "--importance", _importance_with(w, "ninf-curve", _first_curve(lambda points: points[-1].__setitem__(1, float("-inf")))), "--ratio", "0.2", "--out", o], "loss -inf at"),
    ("unsorted loss curve", lambda w, o: ["plan", "--importance", _importance_with(w, "unsorted-curve", _first_curve(lambda points: points.reverse())), "--ratio", "0.2", "--out", o], "must be positive and strictly ascending"),
    ("loss curve falling with removals", lambda w, o: ["plan", "--importance", _importance_with(w, "falling-curve", _first_curve(lambda points: points[-1].__setitem__(1, -100.0))), "--ratio", "0.2", "--out", o], "a removal curve rises with what it removes"),
    # calibration blocks the model cannot take
    ("negative token ids: prune", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--calib", w / "negative-calib.safetensors", "--out", o], "calibration token id -3 is negative"),
    ("negative token ids: learn-masks", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "negative-calib.safetensors", "--ratio", "0.2", "--channel-multiple", "16", "--out", o], "calibration token id -3 is negative"),
    ("negative token ids: importance", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "negative-calib.safetensors", "--out", o], "calibration token id -3 is negative"),
    ("negative token ids: recover", lambda w, o: ["recover", "--model", w / "pruned", "--train-blocks", w / "negative-calib.safetensors", "--out", o], "calibration token id -3 is negative"),
    ("blocks longer than the model: prune", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "plan.json", "--calib", w / "long-calib.safetensors", "--out", o], "blocks of 160 tokens exceed the model's 128 positions"),
    ("blocks longer than the model: importance", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "long-calib.safetensors", "--out", o], "blocks of 160 tokens exceed the model's 128 positions"),
    ("2-token blocks: learn-masks", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "short-calib.safetensors", "--ratio", "0.2", "--channel-multiple", "16", "--out", o], "learning masks needs 8 or more"),
    ("1-token blocks: importance", lambda w, o: ["importance", "--model", w / "model", "--calib", w / "one-token-calib.safetensors", "--out", o], "a next-token loss needs 2 or more"),
    # learn-masks settings, checked before training
    ("learn-masks upper limit inf", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--limits=-0.1,inf", "--out", o], "finite lower < 0 < 1 < upper, got -0.1, inf"),
    ("learn-masks lower limit -inf", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--limits=-inf,1.1", "--out", o], "finite lower < 0 < 1 < upper, got -inf, 1.1"),
    ("learn-masks limits inside [0, 1]", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--limits", "0.1,0.9", "--out", o], "lower < 0 < 1 < upper, got 0.1, 0.9"),
    ("learn-masks channel multiple wider than the MLP", lambda w, o: ["learn-masks", "--model", w / "model", "--calib", w / "calib.safetensors", "--ratio", "0.2", "--channel-multiple", "1000", "--out", o], "channel_multiple 1000 is not below any layer's MLP width"),
    # lengths and artefacts
    ("efficiency prompt beyond the model", lambda w, o: ["efficiency", "--model", w / "model", "--prompt-tokens", "4096", "--out", o], "4128 exceeds the model's 128 positions"),
    ("ppl of a file that is not GGUF", lambda w, o: ["ppl", "--model", w / "user.gguf", "--data-dir", DATA_DIR, "--out", o], "is not a GGUF file"),
    ("recover a plain Hugging Face folder", lambda w, o: ["recover", "--model", w / "model", "--train-blocks", w / "calib.safetensors", "--out", o], "holds no pruning_plan.json: recover trains a checkpoint written by `gqa-prune prune`"),
    ("aggregate entry without ppl", lambda w, o: ["aggregate", "--manifest", _manifest(w), "--csv", o], "manifest variant 'dense': the entry has no 'ppl'"),
    ("aggregate corrupt ppl JSON", lambda w, o: ["aggregate", "--manifest", _manifest(w, ppl=str(w / "corrupt-ppl.json")), "--csv", o], "corrupt-ppl.json' is not valid JSON"),
    ("aggregate ppl JSON without its figures", lambda w, o: ["aggregate", "--manifest", _manifest(w, ppl=str(w / "empty-ppl.json")), "--csv", o], "lacks 'perplexity', 'window', 'tokens_scored'"),
    ("aggregate manifest that does not exist", lambda w, o: ["aggregate", "--manifest", w / "no-manifest.json", "--csv", o], "is neither inline JSON nor an existing file"),
    # mixtures of experts
    ("MoE layout gqa-prune does not know", lambda w, o: ["importance", "--model", w / "phimoe", "--calib", w / "calib.safetensors", "--out", o], "unsupported mixture-of-experts layout 'phimoe'"),
    ("expert ratio leaving fewer experts than top-k", lambda w, o: ["plan", "--importance", w / "moe-importance", "--expert-ratio", "0.8", "--out", o], "keeps 1 of layer 0's 6 experts, fewer than the 2"),
    ("expert ratio on a dense model", lambda w, o: ["plan", "--importance", w / "importance", "--expert-ratio", "0.25", "--out", o], "--expert-ratio: the model scored in"),
    ("whole MoE layers on a dense model", lambda w, o: ["plan", "--importance", w / "importance", "--ratio", "0.2", "--whole-layers", "--out", o], "--whole-layers: the model scored in"),
    ("plan without --ratio", lambda w, o: ["plan", "--importance", w / "importance", "--out", o], "plan: give --ratio"),
    ("expert channels on a dense model", lambda w, o: ["plan", "--importance", w / "importance", "--expert-channel-ratio", "0.5", "--out", o], "--expert-channel-ratio: the model scored in"),
    ("expert channels narrower than the multiple", lambda w, o: ["plan", "--importance", w / "moe-importance", "--expert-ratio", "0.25", "--expert-channel-ratio", "0.5", "--out", o], "keeps no channel of layer 0's 24-channel experts in multiples of 128"),
    ("expert scores without --expert-ratio", lambda w, o: ["plan", "--importance", w / "moe-importance", "--out", o], "give --expert-ratio"),
    ("--ratio leaving a MoE attention layer no GQA group", lambda w, o: ["plan", "--importance", w / "moe-importance", "--ratio", "0.75", "--expert-ratio", "0.25", "--out", o], "--ratio 0.75 keeps no GQA group of layer 0's 2; at most 0.5 is possible"),
    ("expert plan edited to uneven GQA groups", lambda w, o: ["prune", "--model", w / "moe", "--plan", _plan_with(w, "e3.json", lambda d: d.update(kept_groups=[[0], [0, 1], [1]]), "moe-plan.json"), "--out", o], "an expert plan keeps the same number of GQA groups in every attention layer"),
    ("expert ratio not a number", lambda w, o: ["plan", "--importance", w / "moe-importance", "--expert-ratio", "nan", "--out", o], "ratio nan is outside [0, 1)"),
    ("expert plan edited below top-k", lambda w, o: ["prune", "--model", w / "moe", "--plan", _plan_with(w, "e1.json", lambda d: d["kept_experts"].__setitem__(0, [3]), "moe-plan.json"), "--out", o], "layer 0: kept experts: 1 of 6, fewer than the 2"),
    ("expert plan with an expert out of range", lambda w, o: ["prune", "--model", w / "moe", "--plan", _plan_with(w, "e2.json", lambda d: d["kept_experts"].__setitem__(2, [0, 1, 9]), "moe-plan.json"), "--out", o], "layer 2: kept experts must be sorted, unique indices in 0..5"),
    ("expert plan on a dense model", lambda w, o: ["prune", "--model", w / "model", "--plan", w / "moe-plan.json", "--out", o], "'llama' has no mixture-of-experts layers"),
    ("dense plan on a MoE model", lambda w, o: ["prune", "--model", w / "moe", "--plan", w / "plan.json", "--out", o], "'mixtral' is a mixture of experts"),
    ("the full sequential refit on an expert plan", lambda w, o: ["prune", "--model", w / "moe", "--plan", w / "moe-width-plan.json", "--calib", w / "calib.safetensors", "--refit-inputs", "--out", o], "--refit-inputs and --reconstruct-target dense apply to dense plans"),
    ("quantize a mixture of experts with a kernel that crashed on experts", lambda w, o: ["quantize", "--model", w / "moe", "--method", "rtn", "--bits", "8", "--group-size", "16", "--kernel", "torch_int8", "--out", o], "kernel torch_int8 does not run quantized experts here"),
    ("export-gguf a mixture of experts llama.cpp's graphs do not cover", lambda w, o: ["export-gguf", "--model", w / "gpt-oss", "--out", str(o) + ".gguf"], "GGUF export of gpt_oss mixtures of experts is refused: llama.cpp's gpt-oss rounds YaRN's correction range to whole dimensions, the Hugging Face model does not (rope_parameters.truncate: false), so every position's rotation and the logits would differ; exportable: mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoehybrid"),
    ("aggregate manifest without variants", lambda w, o: ["aggregate", "--manifest", '{"model": "tiny"}', "--csv", o], "must be a JSON object with 'model' and a list of 'variants'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "expected"), CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, capsys, case, argv, expected):
    out = tmp_path / "out"
    arguments = [str(part) for part in argv(workspace, out)]
    before = _snapshot(workspace)
    code, _, err = run(capsys, *arguments)
    assert_one_line_error(code, err, expected)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert _snapshot(workspace) == before, "something that existed was changed, removed or left behind"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (what "nothing changed" compares)."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def test_the_corpus_holds_at_least_ninety_distinct_cases():
    assert len({case for case, _, _ in CASES}) == len(CASES) >= 90


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "gqa_prune.cli", *map(str, argv)]


def test_ctrl_c_ends_with_one_line_exit_130_and_nothing_left(workspace, tmp_path):
    """SIGINT while learning masks (waits for the progress bar, not for a time): one line, 130, no output."""
    out = tmp_path / "masks"
    argv = _cli("learn-masks", "--model", workspace / "model", "--calib", workspace / "calib.safetensors",
                "--ratio", "0.2", "--channel-multiple", "16", "--steps", "1000000", "--warmup-steps", "1", "--out", out)  # fmt: skip
    # a CI job started in the background without job control inherits SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the child gets the default disposition back, as an interactive shell would give it
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = b""
    while b"step" not in seen:  # tqdm has started: the process is inside the training loop
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"learn-masks ended before training: {seen.decode(errors='replace')}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    rest = process.communicate()[1]  # SIGINT ends it; no wall-clock bound (a busy machine is slow)
    lines = [line for line in (seen + rest).decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    assert process.returncode == 130
    assert lines[-1] == "gqa-prune learn-masks: interrupted; nothing was written"
    assert not any("Traceback" in line for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(workspace, tmp_path):
    """A 64 KiB tmpfs (a private mount namespace) cannot take the staged model: ENOSPC, one line, nothing left."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; shift; "$@"; code=$?; ls -A "$DISK"; exit $code'
    argv = _cli("stage", "--source", workspace / "model", "--out", disk / "staged")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", disk, *argv], capture_output=True, text=True,
                            env={**os.environ, "DISK": str(disk), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if result.returncode == 99 or "Operation not permitted" in result.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()}")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and f"no space left on the device while writing '{disk / 'staged'}'" in errors[0]
    assert result.stdout.split() == [], "the full disk keeps something of the failed output"
    assert list(disk.iterdir()) == []
