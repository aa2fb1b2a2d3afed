"""One source of checks: a setting the CLI refuses, the workflow's config validation refuses too, before any job,
with the library's own message at the config key it came from; and a setting it takes, both take.

Each case is a config change and the `gqa-prune` call a job of that config would make. The workflow side is a
real `snakemake --dry-run`; the CLI side runs `gqa_prune.cli.main` on a tiny model (checks come before any work).
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, fields

import pytest
from conftest import C4_SHARD, REPO
from helpers import tiny_model
from workflow_helpers import snakemake, tiny_config

from gqa_prune.cli import main
from gqa_prune.errors import SettingError
from gqa_prune.mask_settings import MaskSettings
from gqa_prune.quant_settings import QuantSettings
from gqa_prune.settings import PlanSettings, ReconstructionSettings, RecoverySettings

NAN, INF = math.nan, math.inf
# what each sub-command needs besides the settings under test ({...}: the cli_inputs fixture); a case's own flags
# come after these, and argparse keeps the last value of an option given twice
INPUTS = {
    "plan": "--importance {scores} --channel-multiple 8 --out {out}.json",
    "learn-masks": "--model {model} --calib {calib} --ratio 0.2 --out {out}",
    "prune": "--model {model} --plan {plan} --calib {calib} --out {out}",
    "recover": "--model {model} --train-blocks {calib} --out {out}",
    "quantize": "--model {model} --method rtn --out {out}",
}
L0 = {"plans.criteria": ["taylor", "l0"]}  # the grid then learns masks to every ratio
RTN = {"quantization.apply_to": ["dense"]}


@dataclass(frozen=True)
class Case:
    """A config change (``config``: dotted key -> value) and the CLI call its job makes (``command``, ``flags``);
    the workflow must refuse ``key`` with ``message``, the CLI with ``cli_message`` (default: the same)."""

    name: str
    config: dict
    key: str
    command: str
    flags: str
    message: str
    cli_message: str | None = None


REFUSED = [
    Case("l0 at ratio 0", {**L0, "plans.ratios": [0.0, 0.2]}, "plans.ratios[0]", "learn-masks", "--ratio 0.0",
         "ratio 0.0 must be in (0, 1): masks are learned to remove something"),
    Case("l0 baseline at ratio 0", {"plans.baselines": [{"criterion": "l0", "ratio": 0.0}]},
         "plans.baselines[0].ratio", "learn-masks", "--ratio 0",
         "must be in (0, 1): masks are learned to remove something"),
    Case("a ratio that is no number", {"plans.ratios": [0.2, NAN]}, "plans.ratios[1]", "plan", "--ratio nan",
         "ratio nan is outside [0, 1)"),
    Case("min_rate above max_rate", {"plans.min_rate": 0.5, "plans.max_rate": 0.3}, "plans.min_rate", "plan",
         "--ratio 0.2 --mode width --min-rate 0.5 --max-rate 0.3",
         "need 0 <= min_rate <= max_rate < 1, got min_rate=0.5, max_rate=0.3"),
    Case("alpha not a number", {"plans.alpha": NAN}, "plans.alpha", "plan", "--ratio 0.2 --mode width --alpha nan",
         "alpha nan must be >= 0"),
    Case("a hand split that is no number", {"plans.attn_ratio": NAN}, "plans.attn_ratio", "plan",
         "--ratio 0.2 --mode width --attn-ratio nan", "nan is outside [0, 1): give the fraction of parameters"),
    Case("a protected layer the model lacks", {"plans.protect": [3]}, "plans.protect", "plan",
         "--ratio 0.2 --mode width --protect 3", "protected layer 3 does not exist: the model has layers 0..2"),
    Case("masks: warm-up longer than training", {**L0, "learn_masks.steps": 5, "learn_masks.warmup_steps": 10},
         "learn_masks.warmup_steps", "learn-masks", "--steps 5 --warmup-steps 10", "steps 5 < warm-up 10"),
    Case("masks: infinite learning rate", {**L0, "learn_masks.mask_lr": INF}, "learn_masks.mask_lr", "learn-masks",
         "--mask-lr inf", "mask_lr must be a finite number > 0, got inf"),
    Case("masks: lambda2 not a number", {**L0, "learn_masks.lambda2_init": NAN}, "learn_masks.lambda2_init",
         "learn-masks", "--lambda2-init nan", "lambda2_init must be a finite number >= 0, got nan"),
    Case("refit ridge not a number", {"reconstruction.ridge": NAN}, "reconstruction.ridge", "prune", "--ridge nan",
         "reconstruction ridge nan must be a finite number > 0"),
    Case("LoRA warm-up as long as training", {"recovery.steps": 3, "recovery.warmup_steps": 3},
         "recovery.warmup_steps", "recover", "--steps 3 --warmup-steps 3", "warmup_steps 3 must be in [0, steps=3)"),
    Case("LoRA learning rate not a number", {"recovery.lr": NAN}, "recovery.lr", "recover", "--lr nan",
         "need lr > 0, alpha > 0, temperature > 0 and 0 <= dropout < 1; got lr=nan"),
    Case("kd temperature not a number", {"recovery.temperature": NAN}, "recovery.temperature", "recover",
         "--loss kd --temperature nan", "temperature=nan"),
    Case("a group size the int4 kernel lacks", {**RTN, "quantization.methods": [{"method": "rtn", "bits": 4,
         "group_size": 256}]}, "quantization.methods[0].group_size", "quantize", "--bits 4 --group-size 256",
         "group size 256 is not supported by the torch_aten kernel"),
    Case("bits the chosen kernel lacks", {**RTN, "quantization.kernel": "torch_int8", "quantization.methods": [
         {"method": "rtn", "bits": 3, "group_size": 32}]}, "quantization.methods[0].bits", "quantize",
         "--kernel torch_int8 --bits 3 --group-size 32", "bits 3 is not supported by the torch_int8 kernel"),
    # not the library's checks: the CLI's integer options, and what hybrid plans need from importance
    Case("an integer written as 10.0", {"recovery.steps": 10.0}, "recovery.steps", "recover", "--steps 10.0",
         "10.0 is not of type 'integer'", cli_message="argument --steps: '10.0' is not an integer"),
    Case("bits written as 4.0", {**RTN, "quantization.methods": [{"method": "rtn", "bits": 4.0, "group_size": 32}]},
         "quantization.methods[0].bits", "quantize", "--bits 4.0 --group-size 32", "4.0 is not of type 'integer'",
         cli_message="argument --bits: invalid int value: '4.0'"),
    Case("hybrid plans without loss curves", {"importance.curves": False, "plans.modes": ["width", "hybrid"]},
         "importance.curves", "plan", "--ratio 0.2 --mode hybrid",
         "hybrid plans (taylor-hybrid-r0.20) price unit kinds by the measured loss curves",
         cli_message="mode hybrid needs measured loss curves of every kind"),
]  # fmt: skip
# settings both take: the plan commands of a dry run, run by the CLI on the tiny model's scores
ACCEPTED = {
    "width plans at ratio 0": {"plans.ratios": [0.0, 0.2]},
    "no contrast between layers": {"plans.alpha": 0},
    "the last layer protected": {"plans.protect": [2]},
    "a hand split keeping attention": {"plans.attn_ratio": 0.0, "plans.mlp_ratio": 0.25},
}


def _cli(argv: list) -> int:
    """The exit status of `gqa-prune ARGV`."""
    try:
        return main([str(part) for part in argv])
    except SystemExit as exit_:  # argparse usage errors
        return exit_.code


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny_tokenizer) -> dict:
    """A tiny Llama (3 layers), calibration blocks, its Taylor scores (no loss curves: width plans only), a plan."""
    root = tmp_path_factory.mktemp("config-checks")
    inputs = {name: root / name for name in ("model", "calib.safetensors", "scores", "plan.json")}
    tiny_model("llama", 3, vocab_size=len(tiny_tokenizer)).save_pretrained(inputs["model"])
    tiny_tokenizer.save_pretrained(inputs["model"])
    calls = [
        ["calib", "--model", inputs["model"], "--source", C4_SHARD, "--n-samples", "4", "--seq-len", "32", "--out",
         inputs["calib.safetensors"]],
        ["importance", "--model", inputs["model"], "--calib", inputs["calib.safetensors"], "--no-curves", "--device",
         "cpu", "--out", inputs["scores"]],
        ["plan", "--importance", inputs["scores"], "--ratio", "0.2", "--mode", "width", "--channel-multiple", "8",
         "--out", inputs["plan.json"]],
    ]  # fmt: skip
    for argv in calls:
        assert _cli(argv) == 0, argv
    return {"model": inputs["model"], "calib": inputs["calib.safetensors"], "scores": inputs["scores"],
            "plan": inputs["plan.json"]}  # fmt: skip


def workflow_config(model_dir, overrides: dict) -> dict:
    """The workflow tests' tiny config on this model, with the plans' MLP width step of the CLI calls here."""
    return tiny_config(model_dir, **{"plans.channel_multiple": 8, **overrides})


@pytest.mark.parametrize("case", REFUSED, ids=[case.name for case in REFUSED])
def test_the_cli_and_the_workflow_refuse_the_same_settings(case, cli_inputs, tmp_path, capsys):
    paths = {**cli_inputs, "out": tmp_path / "out"}
    code = _cli([case.command, *shlex.split(f"{INPUTS[case.command]} {case.flags}".format(**paths))])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(error_lines) == 1 and (case.cli_message or case.message) in error_lines[0], err[-2000:]
    assert not list(tmp_path.iterdir())

    done = snakemake(tmp_path, workflow_config(cli_inputs["model"], case.config), "--dry-run", "--cores", "1",
                     check=False)  # fmt: skip
    output = done.stdout + done.stderr  # a dry run logs to stdout
    assert done.returncode != 0 and "invalid config:" in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith(f"  {case.key}: ")]
    assert any(case.message in line for line in lines), output[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def _plan_options(dry_run_output: str) -> list[dict[str, str]]:
    """The options of each `gqa-prune plan` call a dry run prints (all take a value: no plan setting is a bare flag)."""
    calls = []
    for match in re.finditer(r"python -m gqa_prune\.cli plan (.*?) > ", dry_run_output):
        argv = shlex.split(match[1])
        assert len(argv) % 2 == 0 and all(option.startswith("--") for option in argv[::2]), argv
        calls.append(dict(zip(argv[::2], argv[1::2])))
    return calls


@pytest.mark.parametrize("overrides", ACCEPTED.values(), ids=list(ACCEPTED))
def test_settings_the_workflow_takes_the_cli_takes(overrides, cli_inputs, tmp_path, capsys):
    done = snakemake(tmp_path, workflow_config(cli_inputs["model"], overrides), "--dry-run", "--cores", "1",
                     "--printshellcmds")  # fmt: skip
    calls = _plan_options(done.stdout)
    assert calls, done.stdout[-3000:]
    for number, options in enumerate(calls):  # on the tiny model's Taylor scores, without the plot
        options.pop("--plot")
        options.update({"--importance": cli_inputs["scores"], "--out": tmp_path / f"plan-{number}.json"})
        argv = ["plan", *(part for option in options.items() for part in option)]
        assert _cli(argv) == 0, (argv, capsys.readouterr().err[-2000:])


BAD_SETTINGS = [
    PlanSettings(ratio=0.2, mode="width", min_rate=0.9),
    PlanSettings(ratio=0.2, mode="hybrid", mlp_ratio=0.1),
    PlanSettings(ratio=0.2, protected_layers=(7,)),
    MaskSettings(ratio=0.2, lower=0.5),
    MaskSettings(ratio=0.2, kinds=("heads",)),
    ReconstructionSettings(select="greedy"),
    ReconstructionSettings(inputs="yes"),
    RecoverySettings(dropout=1.0),
    QuantSettings(method="awq"),
]


@pytest.mark.parametrize("settings", BAD_SETTINGS, ids=lambda settings: type(settings).__name__)
def test_every_refusal_names_the_field_at_fault(settings):
    """The workflow reports a refusal at the config key of the field it names; so that field must exist."""
    with pytest.raises(SettingError) as refused:
        settings.validate(4) if isinstance(settings, PlanSettings) else settings.validate()
    assert refused.value.field in {item.name for item in fields(settings)}


def test_the_workflow_validates_without_torch():
    """common.smk runs on every Snakemake invocation: the library modules it imports never import torch."""
    text = (REPO / "workflow/rules/common.smk").read_text()
    modules = re.findall(r"^from (gqa_prune[\w.]*) import", text, re.M)
    assert {"gqa_prune.settings", "gqa_prune.mask_settings", "gqa_prune.quant_settings"} <= set(modules)
    code = f"import sys; import {', '.join(modules)}; assert 'torch' not in sys.modules, 'torch'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
