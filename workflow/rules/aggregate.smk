# every variant's artefacts -> tradeoff.{csv,md}: one row per variant, each number read from a named file.


def tradeoff_manifest(model: str) -> dict:
    """Which artefact each figure of the table comes from (written beside the table as tradeoff.sources.json)."""
    entries = []
    for variant in VARIANTS:
        parts = parse_variant(variant)
        benchmarks = {"ppl": f"results/{model}/benchmarks/ppl/{variant}.tsv"}
        entry = {"variant": variant, "model": model_path(model, variant), "ppl": f"results/{model}/eval/{variant}/ppl.json",
                 "recovery": parts["recovery"] or "none", "quant": parts["quant"] or "none"}
        if parts["prune"] == "dense":
            benchmarks["stage"] = f"results/{model}/benchmarks/stage.tsv"
        else:
            entry["ratio"] = parts["ratio"]
            entry["plan"] = f"results/{model}/plans/{parts['prune']}.json"
            if parts["criterion"] == LEARNED:  # the masks' training is this variant's scoring cost
                scoring = Path(importance_dir(model, parts["prune"])).name
                benchmarks["learn_masks"] = f"results/{model}/benchmarks/learn_masks/{scoring}.tsv"
            else:
                benchmarks["importance"] = f"results/{model}/benchmarks/importance/{CALIB}-{parts['criterion']}.tsv"
            benchmarks["prune"] = f"results/{model}/benchmarks/prune/{parts['prune']}.tsv"
        if parts["recovery"]:
            benchmarks["recover"] = f"results/{model}/benchmarks/recover/{parts['prune']}-lora-{parts['recovery']}.tsv"
        if parts["quant"]:
            benchmarks["quantize"] = f"results/{model}/benchmarks/quantize/{variant}.tsv"
        entry["efficiency"] = f"results/{model}/eval/{variant}/efficiency.json"
        if variant in EVALUATED_VARIANTS:
            entry["lm_eval"] = f"results/{model}/eval/{variant}/lm_eval.json"
            benchmarks["evaluate"] = f"results/{model}/benchmarks/evaluate/{variant}.tsv"
        entry["benchmarks"] = benchmarks
        entries.append(entry)
    ppl = config["eval"]["ppl"]
    notes = [
        "PPL: WikiText-2 raw test, GPTQ-style text, non-overlapping windows of "
        f"{ppl['window'] or 'min(2048, model max)'} tokens, "
        + (f"first {ppl['max_tokens']:,} tokens." if ppl["max_tokens"] else "the whole test set."),
        "linear_bits: storage bits per weight of the decoder's linear layers (scales, zeros, indices included); "
        "bytes: weight files on disk.",
        f"Wall times (*_s) and peak resident memory (*_max_rss_mb) are Snakemake benchmarks on device '{config['device']}'.",
    ]
    if EVALUATED_VARIANTS:
        limits = ", ".join(f"{task} {limit or 'all'}" for task, limit in sorted(EVAL["tasks"].items()))
        source = "offline copies of lm-eval's tasks (lm-eval's prompts and metrics)" if DATA_DIR else "lm-eval's hub tasks"
        latency = EVAL["efficiency"]
        notes += [
            f"Tasks: {source}, zero-shot; items scored: {limits} (wikitext: documents). mean_acc averages acc_norm "
            "(acc for winogrande) over the multiple-choice tasks.",
            f"Latency on '{config['device']}' with {HEAVY_THREADS} threads at batch 1: prefill of {latency['prompt_tokens']} "
            f"tokens, decode of {latency['decode_tokens']} tokens, median of {latency['repeats']} after "
            f"{latency['warmup']} warm-up; peak_memory_mb is the resident-memory growth while loading and timing.",
            "pareto_*: on the front of weight bytes vs mean accuracy, bytes vs perplexity, decode speed vs accuracy.",
        ]
    if RECOVERED_VARIANTS:
        notes.append(f"Recovery: LoRA r={RECOVERY['rank']}, {RECOVERY['steps']} steps of {RECOVERY['batch_size']} x "
                     f"{RECOVERY['data']['seq_len']} tokens of {RECOVERY['data']['source']}, lr {RECOVERY['lr']}; "
                     "lm = language-modelling loss, kd = distillation from the dense model's logits.")
    if config["model"]["source"] == "embedded:smollm2-135m":
        notes.append("SmolLM2-135M weights are dequantized from 4-bit GGUF (Q4_1): re-quantizing them to 4 bits "
                     "looks unrealistically good.")
    return {"model": model, "variants": entries, "notes": notes}


def tradeoff_inputs(wildcards) -> list[str]:
    manifest = tradeoff_manifest(wildcards.model)
    files = []
    for entry in manifest["variants"]:
        files += [entry["model"], entry["ppl"], *entry["benchmarks"].values()]
        files += [entry[key] for key in ("plan", "lm_eval", "efficiency") if key in entry]
    return files


rule aggregate:
    input:
        tradeoff_inputs,
    output:
        csv=report(f"{RESULTS}/tradeoff.csv", caption="../report/tradeoff.rst", category="Tradeoff"),
        html=report(f"{RESULTS}/tradeoff.html", caption="../report/tradeoff.rst", category="Tradeoff"),
        markdown=f"{RESULTS}/tradeoff.md",
        sources=f"{RESULTS}/tradeoff.sources.json",
        fronts=[
            report(f"{RESULTS}/pareto_{name}.png", caption=f"../report/pareto_{name}.rst", category="Pareto fronts")
            for name in ("bytes_acc", "bytes_ppl", "tps_acc")
        ],
    params:
        manifest=lambda wildcards: json.dumps(tradeoff_manifest(wildcards.model), sort_keys=True),
    log:
        f"{RESULTS}/logs/aggregate.log",
    retries: RETRIES
    resources:
        runtime=RUNTIME["aggregate"],
        mem_mb=1000,
    conda:
        "../../envs/core.yaml"
    shell:
        "{CLI} aggregate --manifest {params.manifest:q} --csv {output.csv} > {log} 2>&1"
