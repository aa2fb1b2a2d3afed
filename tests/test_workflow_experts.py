"""The workflow on a mixture of experts, run for real on a tiny Qwen2-MoE (a shared expert, a dense MLP layer):
one importance pass for every expert criterion, expert plans (with half the GQA groups and shared-expert
channels) in the grid, prune with the least-squares refit of what they cut, LoRA recovery of the experts, INT8
quantization (kernel auto: torch on experts), evaluation and the table."""

from __future__ import annotations

import json

from helpers import tiny_moe
from workflow_helpers import snakemake, tiny_config


def test_the_workflow_prunes_recovers_and_tabulates_experts(tmp_path, bpe_tokenizer):
    model = tiny_moe("qwen2_moe", vocab_size=len(bpe_tokenizer))
    model.save_pretrained(tmp_path / "moe-source")
    bpe_tokenizer.save_pretrained(tmp_path / "moe-source")
    config = tiny_config(tmp_path / "moe-source", **{
        "plans.ratios": [], "plans.baselines": [], "plans.channel_multiple": 8,
        "plans.experts": {"ratios": [0.5], "criteria": ["reap", "frequency"], "channel_ratio": 0.25,
                          "width_ratio": 0.5},
        "recovery.methods": ["lm"], "recovery.apply_to": ["reap-experts-r0.50"], "recovery.router": "trainable",
        "quantization.methods": [{"method": "rtn", "bits": 8, "group_size": 16}],
        "quantization.apply_to": ["reap-experts-r0.50"], "gguf.types": [],
        "eval.apply_to": ["reap-experts-r0.50-lora-lm"], "eval.tasks": {"arc_easy": 2, "piqa": 2},
        "eval.max_length": 128,  # the tiny model's positions
    })  # fmt: skip
    workdir = tmp_path / "work"
    workdir.mkdir()
    dry = snakemake(workdir, config, "--dry-run", "--cores", "1", "--printshellcmds").stdout
    importance = [line for line in dry.splitlines() if " importance --model " in line]
    assert len(importance) == 1 and "importance/c4-experts" in importance[0] and "--criterion" not in importance[0]
    gradients = {**config, "plans": {**config["plans"], "experts": {**config["plans"]["experts"],
                                                                   "criteria": ["reap", "fisher"]}}}  # fmt: skip
    dry_gradients = snakemake(workdir, gradients, "--dry-run", "--cores", "1", "--printshellcmds").stdout
    importance = [line for line in dry_gradients.splitlines() if " importance --model " in line]
    assert len(importance) == 1 and "--criterion fisher" in importance[0]  # one pass, with a backward per batch
    assert any(
        " plan --importance " in line and "--expert-criterion fisher" in line for line in dry_gradients.splitlines()
    )
    plan = next(line for line in dry.splitlines() if " plan --importance " in line and "reap-experts" in line)
    assert (
        "--expert-ratio 0.5 --expert-criterion reap --experts uniform --expert-channel-ratio 0.25 --ratio 0.5" in plan
    )
    prune = [line for line in dry.splitlines() if " prune --model " in line]
    # the plans cut GQA groups and channels: refit, with the ridge, the choice of units and the batch size only
    assert len(prune) == 2 and all("--calib" in line and "--ridge 0.3 --select obs" in line for line in prune), prune
    assert not any("--reconstruct-target" in line or "--refit-inputs" in line for line in prune)
    assert "--router trainable" in next(line for line in dry.splitlines() if " recover --model " in line)

    config["plans"]["experts"]["criteria"] = ["reap"]  # the real run: one criterion (the dry run showed the sharing)
    done = snakemake(workdir, config, "--cores", "2")
    results = workdir / "results/tiny"
    rows = (results / "tradeoff.csv").read_text().splitlines()
    variants = [row.split(",")[1] for row in rows[1:]]
    assert "removed_experts" in rows[0].split(",") and ",reap,experts uniform," in rows[2]
    header = rows[0].split(",")
    assert float(rows[2].split(",")[header.index("removed_experts")]) == 0.5
    assert variants == ["dense", "reap-experts-r0.50", "reap-experts-r0.50-lora-lm", "reap-experts-r0.50-rtn-w8g16"], (
        done.stderr[-2000:]
    )
    quantized = rows[variants.index("reap-experts-r0.50-rtn-w8g16") + 1].split(",")
    assert 8 < float(quantized[header.index("linear_bits")]) < 16, rows
    for variant in ["reap-experts-r0.50"]:
        pruned = json.loads((results / f"pruned/{variant}/config.json").read_text())
        assert pruned["num_experts"] == 3 and pruned["moe_intermediate_size"] == 8 and "auto_map" not in pruned
        assert pruned["num_key_value_heads"] == 1 and pruned["num_attention_heads"] == 2  # GQA groups: 2 -> 1
        assert pruned["shared_expert_intermediate_size"] == 8  # 20 - 10, in multiples of 8
    lm_eval = json.loads((results / "eval/reap-experts-r0.50-lora-lm/lm_eval.json").read_text())
    assert lm_eval  # evaluated through lm-eval like any Hugging Face model
