"""`snakemake --profile slurm` against a running Slurm: submission, equality with a local run, re-runs,
memory retries, GPU requests and cancellation on SIGINT.

The profile is the shipped template rendered by the same function `gqa-prune profile install` uses, with
CI pacing added (short status intervals). Start a local Slurm with tests/slurm/setup.sh; .ci/run does.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from workflow_helpers import ENV, SNAKEMAKE, snakemake, tiny_config

from gqa_prune.profile import render_slurm_profile

pytestmark = pytest.mark.slurm
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)?\.?$", re.M)


def slurm_profile(folder: Path) -> Path:
    """What `gqa-prune profile install --partition debug --account gqa-prune-ci` writes, paced for CI."""
    profile = yaml.safe_load(render_slurm_profile("debug", "gqa-prune-ci"))
    profile.update({
        "slurm-init-seconds-before-status-checks": 2,
        "seconds-between-status-checks": 2,
        "latency-wait": 5,
        "jobs": 4,
    })  # fmt: skip
    profile["default-resources"]["runtime"] = 30
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def chain_config(model_dir: Path, **overrides) -> dict:
    """stage -> calib -> importance -> plan -> prune -> ppl / evaluate / efficiency -> aggregate, tiny."""
    return tiny_config(
        model_dir,
        **{
            "plans.ratios": [0.2],
            "plans.baselines": [],
            "recovery.methods": [],
            "quantization.methods": [],
            "gguf.types": [],
            "eval.tasks": {"arc_easy": 4, "piqa": 4, "wikitext": 1},
            **overrides,
        },
    )


def submissions(output: str) -> list[tuple[str, str, int]]:
    """(rule, wildcards after the model, Slurm job id) of every job Snakemake submitted, from its log lines.

    The plugin names a job's log .snakemake/slurm_logs/rule_<rule>/<wildcards joined by _>/<jobid>.log.
    """
    jobs = []
    for match in SUBMITTED.finditer(output):
        log = Path(match[2])
        rule, wildcards = log.parent.parent.name.removeprefix("rule_"), log.parent.name
        jobs.append((rule, wildcards.partition("_")[2], int(match[1])))
    return jobs


def job_field(job_id: int, field: str) -> str:
    """A field of `scontrol -d show job` (finished jobs stay visible: setup.sh sets MinJobAge=3600)."""
    text = subprocess.run(["scontrol", "-d", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", text)
    return match[1] if match else ""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slurm_and_local_runs(slurm_cluster, tmp_path_factory, tiny_tokenizer):
    """The same tiny chain through Slurm and locally; efficiency jobs ask Slurm for a (fake) GPU."""
    from helpers import quantizable_model

    root = tmp_path_factory.mktemp("slurm")
    model = quantizable_model(len(tiny_tokenizer))
    model.save_pretrained(root / "source")
    tiny_tokenizer.save_pretrained(root / "source")
    config = chain_config(root / "source")
    profile = slurm_profile(root / "profile")
    (root / "slurm").mkdir()
    (root / "local").mkdir()
    through_slurm = snakemake(root / "slurm", config, "--profile", str(profile), "--set-resources", "efficiency:gpu=1")
    # locally only what test_outputs_equal_those_of_a_local_run compares (lm-eval and latency jobs cost minutes)
    targets = [f"results/tiny/{output}" for output in LOCAL_TARGETS]
    snakemake(root / "local", config, "--cores", "2", *targets)
    return root, config, profile, through_slurm.stdout + through_slurm.stderr


VARIANTS = ("dense", "taylor-inverse-r0.20")
# files compared, and the rule outputs (files or folders) that hold them
COMPARED = ("calib/c4.safetensors", "importance/c4-taylor/units.safetensors", "plans/taylor-inverse-r0.20.json",
            "pruned/taylor-inverse-r0.20/model.safetensors")  # fmt: skip
LOCAL_TARGETS = (
    "calib/c4.safetensors",
    "importance/c4-taylor",
    "plans/taylor-inverse-r0.20.json",
    "pruned/taylor-inverse-r0.20",
    *(f"eval/{variant}/ppl.json" for variant in VARIANTS),
)


def test_every_job_goes_through_slurm(slurm_and_local_runs):
    root, _, _, output = slurm_and_local_runs
    jobs = submissions(output)
    rules = sorted(rule for rule, _, _ in jobs)
    assert rules == sorted(
        ["stage", "calib", "importance", "plan", "prune", "ppl", "ppl", "evaluate", "evaluate",
         "efficiency", "efficiency", "aggregate"]
    )  # fmt: skip
    for rule, _, job_id in jobs:
        assert job_field(job_id, "JobState") == "COMPLETED", (rule, job_id)
        assert job_field(job_id, "Partition") == "debug"
        assert job_field(job_id, "WorkDir") == str(root / "slurm")
        assert job_field(job_id, "StdOut").startswith(str(root / f"slurm/.snakemake/slurm_logs/rule_{rule}/"))


def test_gpu_rule_lands_on_the_gpu_gres(slurm_and_local_runs):
    jobs = submissions(slurm_and_local_runs[3])
    gpu_jobs = [job_id for rule, _, job_id in jobs if rule == "efficiency"]
    cpu_jobs = [job_id for rule, _, job_id in jobs if rule == "ppl"]
    assert len(gpu_jobs) == 2 and len(cpu_jobs) == 2
    for job_id in gpu_jobs:
        assert job_field(job_id, "JOB_GRES") == "gpu:1", job_id
    for job_id in cpu_jobs:
        assert job_field(job_id, "JOB_GRES") in ("", "(null)"), job_id


def test_outputs_equal_those_of_a_local_run(slurm_and_local_runs):
    root = slurm_and_local_runs[0]
    slurm, local = root / "slurm/results/tiny", root / "local/results/tiny"
    for relative in COMPARED:
        assert _digest(slurm / relative) == _digest(local / relative), relative
    for variant in VARIANTS:
        ours, theirs = (json.loads((base / "eval" / variant / "ppl.json").read_text()) for base in (slurm, local))
        assert ours == {**theirs, "model": ours["model"]}


def test_changed_ratio_reruns_only_its_downstream_through_slurm(slurm_and_local_runs):
    root, config, profile, _ = slurm_and_local_runs
    changed = {**config, "plans": {**config["plans"], "ratios": [0.2, 0.3]}}
    done = snakemake(root / "slurm", changed, "--profile", str(profile))
    jobs = {(rule, where) for rule, where, _ in submissions(done.stdout + done.stderr)}
    assert jobs == {
        ("plan", "taylor-inverse-r0.30"),
        ("prune", "taylor-inverse-r0.30"),
        ("ppl", "taylor-inverse-r0.30"),
        ("evaluate", "taylor-inverse-r0.30"),
        ("efficiency", "taylor-inverse-r0.30"),
        ("aggregate", ""),
    }


def test_job_that_exceeds_its_memory_is_retried_with_more(slurm_cluster, tmp_path, tiny_model_dir):
    # the dense PPL job needs ~1 GB (Snakemake's job step plus the CLI): 700 MB first, 1,400 MB on retry
    config = chain_config(tiny_model_dir, **{"resources.mem_base_mb": 700, "resources.stage_mem_mb": 3000})
    profile = slurm_profile(tmp_path / "profile")
    done = snakemake(tmp_path, config, "--profile", str(profile), "results/tiny/eval/dense/ppl.json")
    attempts = [job_id for rule, _, job_id in submissions(done.stdout + done.stderr) if rule == "ppl"]
    assert len(attempts) == 2, done.stdout[-3000:]
    first, second = attempts
    assert job_field(first, "JobState") in ("FAILED", "OUT_OF_MEMORY", "CANCELLED")
    assert job_field(second, "JobState") == "COMPLETED"
    assert job_field(first, "MinMemoryNode") == "700M" and job_field(second, "MinMemoryNode") == "1400M"
    log = next((tmp_path / ".snakemake/slurm_logs").rglob(f"{first}.log")).read_text()
    assert "exceeded memory limit" in log.lower() or "oom" in log.lower()
    assert (tmp_path / "results/tiny/eval/dense/ppl.json").is_file()


def _default_sigint() -> None:
    """A shell starts background commands with SIGINT ignored, and children inherit that (so would Snakemake)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_cancels_the_submitted_jobs(slurm_cluster, tmp_path, tiny_model_dir):
    # many calibration blocks keep the importance job busy long enough to interrupt it
    config = chain_config(tiny_model_dir, **{"calibration.n_samples": 3000, "importance.batch_size": 1})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    profile = slurm_profile(tmp_path / "profile")
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config_file),
               "--profile", str(profile), "results/tiny/importance/c4-taylor"]  # fmt: skip
    output = tmp_path / "snakemake.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            command,
            env={**ENV, "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
        )
    # interrupt once Snakemake has submitted the importance job and had time to register it as active (it logs
    # the submission first); the job then still has ~20 s ahead of it (job step start-up, imports, 3,000 batches)
    deadline, running = time.monotonic() + 1800, None  # generous guards against a hang, not speed limits
    while running is None:
        assert process.poll() is None and time.monotonic() < deadline, "importance was never submitted"
        time.sleep(0.5)
        running = next((job for rule, _, job in submissions(output.read_text()) if rule == "importance"), None)
    time.sleep(3)
    assert job_field(running, "JobState") in ("PENDING", "RUNNING")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=1200)
    deadline = time.monotonic() + 600
    while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, "jobs still queued after SIGINT"
        time.sleep(1)
    assert job_field(running, "JobState") == "CANCELLED"
    assert not (tmp_path / "results/tiny/importance/c4-taylor").exists()
