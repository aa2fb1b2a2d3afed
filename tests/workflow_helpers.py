"""Running the Snakemake workflow from tests: configs for tiny models, runs, and the jobs a dry run plans."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import DATA_DIR, REPO

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
PRUNED = ["random-inverse-r0.20", "taylor-inverse-r0.20", "taylor-inverse-r0.30"]
RECOVERED = ["taylor-inverse-r0.20-lora-lm", "taylor-inverse-r0.20-lora-kd"]
QUANTIZED = [
    f"{base}-{quant}" for base in ("dense", "taylor-inverse-r0.20-lora-kd") for quant in ("gptq-w4g32", "rtn-w8g32")
]
GGUF = [f"{base}-gguf-q8_0" for base in ("dense", "taylor-inverse-r0.20-lora-kd")]  # f16: tests/test_gguf.py
VARIANTS = ["dense", *PRUNED, *RECOVERED, *QUANTIZED, *GGUF]
# lm-eval runs on these only (each job costs ~14 s on 2 cores): a dense, a recovered and a GPTQ model
EVALUATED = ["dense", "taylor-inverse-r0.20-lora-kd", "taylor-inverse-r0.20-lora-kd-gptq-w4g32"]


def tiny_config(model_dir: Path, **overrides) -> dict:
    config = {
        "model": {"name": "tiny", "source": str(model_dir)},
        "device": "cpu",
        "data_dir": str(DATA_DIR),
        "calibration": {"n_samples": 8, "seq_len": 64},  # 512 tokens: enough rows for the refit
        "plans": {
            "ratios": [0.2, 0.3],
            "criteria": ["taylor"],
            "strategies": ["inverse"],
            "modes": ["width"],
            "baselines": [{"criterion": "random", "strategy": "inverse", "ratio": 0.2}],
            "channel_multiple": 32,
        },
        "recovery": {
            "methods": ["lm", "kd"],
            "apply_to": ["taylor-inverse-r0.20"],
            "steps": 3,
            "warmup_steps": 1,
            "data": {"n_samples": 6, "seq_len": 32},
        },
        "quantization": {
            "methods": [
                {"method": "gptq", "bits": 4, "group_size": 32},
                {"method": "rtn", "bits": 8, "group_size": 32},
            ],
            "apply_to": ["dense", "taylor-inverse-r0.20-lora-kd"],
            "n_samples": 8,
        },
        "gguf": {
            "types": ["q8_0"],  # written as f32, then quantized by llama.cpp: both export paths
            "apply_to": ["dense", "taylor-inverse-r0.20-lora-kd"],
            "efficiency": {"prompt_tokens": 8, "decode_tokens": 4, "repeats": 1},
        },
        "eval": {
            "ppl": {"window": 32, "max_tokens": 256},
            "tasks": {"arc_easy": 4, "piqa": 4, "winogrande": 4, "hellaswag": 2, "arc_challenge": 2, "wikitext": 1},
            "max_length": 512,  # the tiny model's positions (more is refused)
            "efficiency": {"prompt_tokens": 8, "decode_tokens": 2, "repeats": 1, "warmup": 0},
        },
        "resources": {"threads": 1, "model_mb": 1},
    }
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


def workflow_config(model_dir: Path, **overrides) -> dict:
    """The grid of the real workflow run (tests/test_workflow.py): tiny_config, lm-eval on EVALUATED only."""
    return tiny_config(model_dir, **{"eval.apply_to": EVALUATED, **overrides})


def snakemake(workdir: Path, config: dict, *args: str, snakefile: Path = REPO / "Snakefile", check: bool = True):
    config_file = workdir / f"config-{time.monotonic_ns()}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [SNAKEMAKE, "-s", str(snakefile), "--directory", str(workdir), "--configfile", str(config_file), *args]
    # a guard against a hung Snakemake only (a busy machine must not trip it): two hours
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=7200)
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def planned_jobs(workdir: Path, config: dict, **kwargs) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    done = snakemake(workdir, config, "--dry-run", "--cores", "1", **kwargs)
    jobs, current = [], None
    for line in (done.stdout + done.stderr).splitlines():
        stripped = line.strip()
        if match := re.fullmatch(r"(?:local)?rule (\w+):", stripped):
            current = [match[1], ""]
            jobs.append(current)
        elif current and stripped.startswith("wildcards:"):  # normalised to sorted "key=value, ..."
            current[1] = ", ".join(sorted(part.strip() for part in stripped.removeprefix("wildcards:").split(",")))
    return {(rule, wildcards) for rule, wildcards in jobs}


def jobs_for(rule: str, variants) -> set[tuple[str, str]]:
    return {(rule, f"model=tiny, variant={variant}") for variant in variants}


def evaluation_of(variants) -> set[tuple[str, str]]:
    """A changed model is measured again: perplexity, efficiency, and lm-eval tasks where eval.apply_to names it."""
    evaluated = [variant for variant in variants if variant in EVALUATED]
    return jobs_for("ppl", variants) | jobs_for("evaluate", evaluated) | jobs_for("efficiency", variants)


def derived_from(variants, candidates) -> list[str]:
    """The candidates made from any of ``variants`` (quantized or GGUF ones of a recovered model, ...)."""
    return [candidate for candidate in candidates if any(candidate.startswith(f"{v}-") for v in variants)]


def downstream_of_plan(variants) -> set[tuple[str, str]]:
    """Jobs that follow new plans of these pruned variants: prune, recovery and quantization of what
    derives from them, PPL of everything, and the table."""
    recovered = derived_from(variants, RECOVERED)
    quantized, exported = derived_from(recovered, QUANTIZED), derived_from(recovered, GGUF)
    jobs = {("aggregate", "model=tiny"), ("all", "")}
    jobs |= jobs_for("plan", variants) | jobs_for("prune", variants) | jobs_for("recover", recovered)
    jobs |= jobs_for("quantize", quantized) | jobs_for("export_gguf", exported)
    jobs |= evaluation_of([*variants, *recovered, *quantized, *exported])
    return jobs


def rule_blocks(dry_run_output: str) -> dict[str, str]:
    """A dry run's text per rule (the last job of each rule): its input, output, reason, resources."""
    blocks = re.finditer(r"rule (\w+):\n(.*?)(?=\n\[|\nJob stats)", dry_run_output, re.S)
    return {match[1]: match[2] for match in blocks}
