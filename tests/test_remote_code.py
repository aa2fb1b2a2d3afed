"""No code from a model folder runs unless the user asked: a foreign auto_map module is never imported."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import plan_for, tiny_model
from test_cli import assert_one_line_error, run

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def evil_model(tmp_path, tiny_model_dir):
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    plan = plan_for(tiny_model("llama", 3), attn_ratio=0.0, mlp_ratio=0.0)  # same shapes as tiny_model_dir
    plan.save(folder / "pruning_plan.json")  # recover reads the plan before the model
    plan.save(tmp_path / "plan.json")
    return folder, marker


@pytest.mark.parametrize(
    "command",
    [
        ["stage", "--source", "{model}", "--out", "{out}"],
        ["calib", "--model", "{model}", "--source", "{c4}", "--n-samples", "2", "--seq-len", "8", "--out", "{out}.st"],
        ["importance", "--model", "{model}", "--calib", "{calib}", "--device", "cpu", "--out", "{out}"],
        ["prune", "--model", "{model}", "--plan", "{plan}", "--out", "{out}"],
        ["ppl", "--model", "{model}", "--data-dir", "{data}", "--window", "16", "--max-tokens", "64", "--device", "cpu"],
        ["efficiency", "--model", "{model}", "--device", "cpu", "--out", "{out}.json"],
        ["evaluate", "--model", "{model}", "--tasks", "piqa=2", "--data-dir", "{data}", "--device", "cpu", "--out", "{out}.json"],
        ["quantize", "--model", "{model}", "--method", "rtn", "--bits", "8", "--group-size", "16", "--out", "{out}"],
        ["recover", "--model", "{model}", "--train-blocks", "{calib}", "--steps", "1", "--warmup-steps", "0", "--out", "{out}"],
    ],
)  # fmt: skip
def test_foreign_auto_map_is_refused_and_never_imported(tmp_path, evil_model, capsys, command):
    from conftest import C4_SHARD, DATA_DIR
    from helpers import calibration_ids
    from safetensors.torch import save_file

    folder, marker = evil_model
    save_file({"input_ids": calibration_ids(blocks=2, length=8)}, str(tmp_path / "calib.safetensors"))
    values = {"model": folder, "out": tmp_path / "out", "c4": C4_SHARD, "calib": tmp_path / "calib.safetensors",
              "plan": tmp_path / "plan.json", "data": DATA_DIR}  # fmt: skip
    argv = [part.format(**values) for part in command]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "ships its own code (evil) that loading would run")
    assert "--trust-remote-code" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_trust_remote_code_lets_the_user_run_it(tmp_path, evil_model, capsys):
    folder, marker = evil_model
    code, _, err = run(
        capsys, "--trust-remote-code", "stage", "--source", str(folder), "--out", str(tmp_path / "staged")
    )
    assert marker.exists()  # the user asked for it
    assert code in (0, 2)  # whatever the evil class then does, it was allowed to run
