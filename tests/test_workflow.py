"""The Snakemake workflow, run for real on a tiny random model: outputs, re-run logic, validation, kills."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from workflow_helpers import (
    ENV,
    EVALUATED,
    GGUF,
    PRUNED,
    QUANTIZED,
    RECOVERED,
    SNAKEMAKE,
    VARIANTS,
    downstream_of_plan,
    evaluation_of,
    jobs_for,
    planned_jobs,
    rule_blocks,
    snakemake,
    tiny_config,
    workflow_config,
)


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory, bpe_tokenizer):
    """The workflow run once for real on a tiny Llama; later tests dry-run changes against it."""
    from helpers import quantizable_model

    root = tmp_path_factory.mktemp("workflow")
    model = quantizable_model(len(bpe_tokenizer))
    model.save_pretrained(root / "tiny-source")
    bpe_tokenizer.save_pretrained(root / "tiny-source")
    workdir = root / "work"
    workdir.mkdir()
    config = workflow_config(root / "tiny-source")
    done = snakemake(workdir, config, "--cores", "2")
    return workdir, config, done


def test_real_run_writes_the_table_and_says_where(workflow_run):
    workdir, _, done = workflow_run
    table = workdir / "results/tiny/tradeoff.csv"
    assert "tradeoff table: results/tiny/tradeoff.md" in done.stdout + done.stderr
    rows = table.read_text().splitlines()
    assert rows[0].startswith("model,variant,criterion,strategy,ratio")
    assert [row.split(",")[1] for row in rows[1:]] == VARIANTS
    for column in ("recovery", "quant", "linear_bits", "importance_s", "prune_max_rss_mb", "recover_s", "quantize_s",
                   "arc_easy_acc_norm", "winogrande_acc", "mean_acc", "kv_cache_bytes_per_token", "prefill_ms",
                   "decode_tokens_per_s", "pareto_bytes_acc", "wikitext_word_ppl"):  # fmt: skip
        assert column in rows[0].split(",")
    for name in ("tradeoff.html", "pareto_bytes_acc.png", "pareto_bytes_ppl.png", "pareto_tps_acc.png"):
        assert (workdir / "results/tiny" / name).is_file()
    sources = json.loads((workdir / "results/tiny/tradeoff.sources.json").read_text())
    for entry in sources["variants"]:  # every figure traces to an artefact that exists
        gguf = entry["variant"] in GGUF  # a file; every other model is a folder
        assert (workdir / entry["ppl"]).is_file()
        assert (workdir / entry["model"]).is_file() if gguf else (workdir / entry["model"]).is_dir()
        assert all((workdir / path).is_file() for path in entry["benchmarks"].values())
    assert (workdir / "results/tiny/pruned/taylor-inverse-r0.30/config.json").is_file()


def test_every_number_in_the_table_traces_to_its_artefact(workflow_run):
    import csv

    workdir = workflow_run[0]
    rows = {row["variant"]: row for row in csv.DictReader(open(workdir / "results/tiny/tradeoff.csv"))}
    sources = json.loads((workdir / "results/tiny/tradeoff.sources.json").read_text())
    for entry in sources["variants"]:
        row = rows[entry["variant"]]
        ppl = json.loads((workdir / entry["ppl"]).read_text())
        efficiency = json.loads((workdir / entry["efficiency"]).read_text())
        assert float(row["ppl"]) == ppl["perplexity"] and int(row["ppl_window"]) == ppl["window"]
        assert row["engine"] == ppl["engine"] == ("llama.cpp" if entry["variant"] in GGUF else "transformers")
        keys = ("bytes", "linear_bits", "decode_tokens_per_s")
        keys += ("prompt_tokens_per_s", "decode_fraction_of_ideal") if entry["variant"] in GGUF else ("prefill_ms",)
        for key in keys:
            assert float(row[key]) == efficiency[key]
        for stage, path in entry["benchmarks"].items():  # wall times are the benchmark files' own figures
            seconds = float((workdir / path).read_text().splitlines()[1].split("\t")[0])
            assert float(row[f"{stage}_s"]) == seconds
        if entry["variant"] not in EVALUATED:  # lm-eval runs model folders only, those eval.apply_to names
            assert "lm_eval" not in entry and not row["mean_acc"]
            continue
        tasks = json.loads((workdir / entry["lm_eval"]).read_text())
        assert float(row["arc_easy_acc_norm"]) == tasks["summary"]["arc_easy"]["acc_norm"]
        assert float(row["winogrande_acc_stderr"]) == tasks["summary"]["winogrande"]["acc_stderr"]
        # the raw lm-eval results are kept too
        assert tasks["lm_eval"]["arc_easy"]["results"]["arc_easy"]["acc_norm,none"] == float(row["arc_easy_acc_norm"])
        primary = [tasks["summary"][t]["acc_norm" if "acc_norm" in tasks["summary"][t] else "acc"]
                   for t in ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")]  # fmt: skip
        assert float(row["mean_acc"]) == pytest.approx(sum(primary) / len(primary), rel=1e-12)


def test_touching_nothing_reruns_nothing(workflow_run):
    workdir, config, _ = workflow_run
    assert planned_jobs(workdir, config) == set()
    done = snakemake(workdir, config, "--cores", "1")
    assert "Nothing to be done" in done.stdout + done.stderr


def test_adding_a_ratio_runs_only_that_plan_and_aggregate(workflow_run):
    workdir, config, _ = workflow_run
    changed = workflow_config(Path(config["model"]["source"]), **{"plans.ratios": [0.2, 0.3, 0.4]})
    assert planned_jobs(workdir, changed) == downstream_of_plan(["taylor-inverse-r0.40"])


def test_changing_a_plan_setting_reruns_plans_and_downstream_not_importance(workflow_run):
    workdir, config, _ = workflow_run
    changed = workflow_config(Path(config["model"]["source"]), **{"plans.alpha": 2.0})
    assert planned_jobs(workdir, changed) == downstream_of_plan(PRUNED)


def test_changing_a_lora_setting_reruns_recovery_and_what_derives_from_it(workflow_run):
    workdir, config, _ = workflow_run
    changed = workflow_config(Path(config["model"]["source"]), **{"recovery.lr": 0.001})
    derived = [v for v in QUANTIZED if v.startswith("taylor-inverse-r0.20-lora-kd-")]
    exported = [v for v in GGUF if v.startswith("taylor-inverse-r0.20-lora-kd-")]
    expected = {("aggregate", "model=tiny"), ("all", "")} | jobs_for("recover", RECOVERED)
    expected |= jobs_for("quantize", derived) | jobs_for("export_gguf", exported)
    expected |= evaluation_of([*RECOVERED, *derived, *exported])
    assert planned_jobs(workdir, changed) == expected


def test_changing_gptq_calibration_reruns_only_gptq_jobs(workflow_run):
    workdir, config, _ = workflow_run
    changed = workflow_config(Path(config["model"]["source"]), **{"quantization.n_samples": 6})
    gptq = [v for v in QUANTIZED if v.endswith("gptq-w4g32")]
    assert planned_jobs(workdir, changed) == {("aggregate", "model=tiny"), ("all", "")} | jobs_for(
        "quantize", gptq
    ) | evaluation_of(gptq)


def test_changing_calibration_reruns_importance_and_downstream_not_staging(workflow_run):
    workdir, config, _ = workflow_run
    changed = workflow_config(Path(config["model"]["source"]), **{"calibration.n_samples": 12})
    expected = downstream_of_plan(PRUNED) | {("calib", "calib=c4, model=tiny")}
    expected |= {("importance", f"calib=c4, criterion={criterion}, model=tiny") for criterion in ("random", "taylor")}
    expected |= jobs_for("quantize", ["dense-gptq-w4g32"]) | evaluation_of(["dense-gptq-w4g32"])  # GPTQ calibrates
    assert planned_jobs(workdir, changed) == expected


def test_editing_a_rules_shell_reruns_that_rule_and_downstream(workflow_run, tmp_path):
    workdir, config, _ = workflow_run
    copy = tmp_path / "workflow-copy"
    copy.mkdir()
    for part in ("Snakefile", "workflow", "profiles", "envs"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / part)
    prune_rule = copy / "workflow/rules/prune.smk"
    text = prune_rule.read_text()
    assert ' --out {output} > {log} 2>&1"' in text
    prune_rule.write_text(text.replace(' --out {output} > {log} 2>&1"', ' --out {output} >> {log} 2>&1"'))
    jobs = planned_jobs(workdir, config, snakefile=copy / "Snakefile")
    assert jobs == downstream_of_plan(PRUNED) - jobs_for("plan", PRUNED)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"plans.criteria": ["taylor", "hessian"]},
            "plans.criteria[1]: 'hessian' is not allowed; allowed: taylor, fisher, magnitude, activation, random",
        ),
        ({"plans.ratios": [0.2, 1.5]}, "plans.ratios[1]: 1.5 must be < 1"),
        ({"model": {"name": "tiny"}}, "model: 'source' is a required property"),
        ({"model.source": "/no/such/model"}, "model.source: '/no/such/model' is not a model folder"),
        (
            {"plans.strategies": ["greedy"]},
            "plans.strategies[0]: 'greedy' is not allowed; allowed: inverse, proportional, uniform",
        ),
        (
            {"gguf.types": ["q3_k"]},
            "gguf.types[0]: 'q3_k' is not allowed; allowed: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m",
        ),
        ({"eval.apply_to": ["dense-gguf-q8_0"]}, "eval.apply_to: 'dense-gguf-q8_0' is a GGUF variant"),
        ({"gguf.apply_to": ["dense-gptq-w4g32"]}, "gguf.apply_to: 'dense-gptq-w4g32' is not a variant of this grid"),
    ],
)
def test_invalid_config_fails_before_any_job(tmp_path, tiny_model_dir, override, expected):
    done = snakemake(tmp_path, tiny_config(tiny_model_dir, **override), "--cores", "1", check=False)
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_gpu_stages_ask_for_a_gpu_and_memory_scales_with_the_model(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir, device="cuda", gpu_model="h100")
    done = snakemake(tmp_path, config, "--dry-run", "--cores", "1")
    blocks = rule_blocks(done.stdout)
    assert "gpu=1" in blocks["importance"] and "gpu_model=h100" in blocks["importance"]
    for rule in ("ppl", "recover", "quantize", "evaluate", "efficiency", "prune"):  # prune refits on the GPU
        assert "gpu=1" in blocks[rule] and "gpu_model=h100" in blocks[rule]
    assert "gpu" not in blocks["plan"] and "gpu" not in blocks["calib"]
    assert "mem_mb=1504" in blocks["importance"]  # 1500 + 4 x model_mb (1 MB estimate before staging)
    assert "runtime=360" in blocks["importance"] and "runtime=10" in blocks["plan"]  # defaults in common.smk


def test_runtime_retries_and_base_memory_come_from_the_config(tmp_path, tiny_model_dir):
    overrides = {"resources.runtime": {"importance": 45}, "resources.mem_base_mb": 700, "resources.retries": 3}
    done = snakemake(tmp_path, tiny_config(tiny_model_dir, **overrides), "--dry-run", "--cores", "1")
    blocks = rule_blocks(done.stdout)
    assert "runtime=45" in blocks["importance"] and "runtime=10" in blocks["plan"]
    assert "mem_mb=704" in blocks["importance"]


def test_report_renders_plots_and_table(workflow_run):
    workdir, config, _ = workflow_run
    snakemake(workdir, config, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert "tradeoff.csv" in html and "taylor-inverse-r0.30.png" in html and "Pruning plan" in html
    assert "pareto_bytes_acc.png" in html and "Pareto front" in html and "tradeoff.html" in html


def test_killed_run_leaves_nothing_a_rerun_accepts(tmp_path, tiny_model_dir):
    # enough calibration blocks that importance runs for a while, then kill Snakemake and its job mid-stage
    config = tiny_config(tiny_model_dir, **{"calibration.n_samples": 1000, "importance.batch_size": 1})
    target = "results/tiny/importance/c4-taylor"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(config_file),
        "--cores",
        "1",
        target,
    ]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = tmp_path / "results/tiny/logs/importance/c4-taylor.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "taylor forward+backward" in log.read_text(errors="replace")):
        assert process.poll() is None and time.monotonic() < deadline, "importance never started"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    assert not (tmp_path / target).exists()
    # a hard kill leaves Snakemake's lock behind: --unlock, then --rerun-incomplete redoes the cut-off job
    snakemake(tmp_path, config, "--unlock")
    assert ("importance", "calib=c4, criterion=taylor, model=tiny") in planned_jobs(tmp_path, config)
    snakemake(tmp_path, config, "--cores", "1", "--rerun-incomplete", target)
    assert (tmp_path / target / "units.safetensors").is_file()
    assert not [path for path in (tmp_path / "results").rglob("*") if ".tmp-" in path.name]


def test_cluster_example_validates_and_plans_the_8b_grid(tmp_path):
    # config/examples/llama-3.1-8b.yaml: 5 ratios x 2 criteria x (2 width strategies + hybrid) + 2 baselines
    # (random, l0 learned masks) = 32 pruned variants
    example = yaml.safe_load((REPO / "config/examples/llama-3.1-8b.yaml").read_text())
    done = snakemake(tmp_path, example, "--dry-run", "--cores", "1")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", done.stdout.split("Job stats:")[1], re.M))
    assert counts["plan"] == counts["prune"] == "32" and counts["stage"] == "1" and counts["learn_masks"] == "1"
    # + 3 pruned x {lm, kd} recovered + 3 bases x {gptq, rtn} quantized, all through lm-eval: self-contained,
    # nothing of the CPU demo's config leaks in
    assert (counts["recover"], counts["quantize"], counts["evaluate"]) == ("6", "6", "45")
    blocks = rule_blocks(done.stdout)
    assert "gpu=1" in blocks["importance"] and "gpu=1" in blocks["recover"] and "gpu" not in blocks["plan"]
    assert "gpu=1" in blocks["learn_masks"]


@pytest.mark.parametrize("example", ["llama-3.1-8b.yaml", "smollm2-grid.yaml"])
def test_snakemake_lint_is_clean(tmp_path, example):
    """The workflow catalog's convention: `snakemake --lint` finds nothing to say about the workflow."""
    config = yaml.safe_load((REPO / "config/examples" / example).read_text())
    done = snakemake(tmp_path, config, "--lint", check=False)
    assert "Congratulations, your workflow is in a good condition!" in done.stdout + done.stderr, done.stdout[-3000:]
    assert done.returncode == 0


def test_plan_modes_are_part_of_variant_ids(tmp_path, tiny_model_dir):
    # width plans keep their <criterion>-<strategy> ids; depth and hybrid plans are <criterion>-<mode>
    config = tiny_config(tiny_model_dir, **{"plans.modes": ["width", "depth", "hybrid"], "plans.ratios": [0.2]})
    done = snakemake(tmp_path, config, "--dry-run", "--cores", "1", "--printshellcmds")
    text = done.stdout
    commands = {line for line in text.splitlines() if " plan --importance " in line}
    for variant, flags, absent in (
        ("taylor-inverse-r0.20", "--ratio 0.2 --mode width --strategy inverse", "--mode hybrid"),
        ("taylor-depth-r0.20", "--ratio 0.2 --mode depth", "--strategy"),
        ("taylor-hybrid-r0.20", "--ratio 0.2 --mode hybrid", "--strategy"),
    ):
        (command,) = [line for line in commands if f"plans/{variant}.json" in line]
        assert flags in command and absent not in command
    importance = next(line for line in text.splitlines() if " importance --model " in line)
    assert "--channel-multiple 32" in importance  # the loss curves use the plans' MLP width step


@pytest.mark.parametrize("inputs", [False, True])
def test_the_full_sequential_refit_reaches_prune_only_when_configured(tmp_path, tiny_model_dir, inputs):
    config = tiny_config(tiny_model_dir, **{"reconstruction.inputs": inputs})
    done = snakemake(tmp_path, config, "--dry-run", "--cores", "1", "--printshellcmds")
    prunes = [line for line in done.stdout.splitlines() if " prune --model " in line]
    assert prunes and all(("--refit-inputs" in line) == inputs for line in prunes)
