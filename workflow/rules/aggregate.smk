# every variant's artefacts -> tradeoff.{csv,md}: one row per variant, each number read from a named file.


def tradeoff_manifest(model: str) -> dict:
    """Which artefact each figure of the table comes from (written beside the table as tradeoff.sources.json)."""
    entries = []
    for variant in VARIANTS:
        entry = {
            "variant": variant,
            "model": model_path(model, variant),
            "ppl": f"results/{model}/eval/{variant}/ppl.json",
            "benchmarks": {"ppl": f"results/{model}/benchmarks/ppl/{variant}.tsv"},
        }
        if variant == "dense":
            entry["benchmarks"]["stage"] = f"results/{model}/benchmarks/stage.tsv"
        else:
            parsed = parse_variant(variant)
            entry["ratio"] = parsed["ratio"]
            entry["plan"] = f"results/{model}/plans/{variant}.json"
            entry["benchmarks"]["importance"] = f"results/{model}/benchmarks/importance/{CALIB}-{parsed['criterion']}.tsv"
            entry["benchmarks"]["prune"] = f"results/{model}/benchmarks/prune/{variant}.tsv"
        entries.append(entry)
    ppl = config["eval"]["ppl"]
    notes = [
        "PPL: WikiText-2 raw test, GPTQ-style text, non-overlapping windows of "
        f"{ppl['window'] or 'min(2048, model max)'} tokens, "
        + (f"first {ppl['max_tokens']:,} tokens." if ppl["max_tokens"] else "the whole test set."),
        f"Wall times (*_s) and peak resident memory (*_max_rss_mb) are Snakemake benchmarks on device '{config['device']}'.",
    ]
    if config["model"]["source"] == "embedded:smollm2-135m":
        notes.append("SmolLM2-135M weights are dequantized from 4-bit GGUF (Q4_1): 4-bit re-quantization looks unrealistically good.")
    return {"model": model, "variants": entries, "notes": notes}


def tradeoff_inputs(wildcards) -> list[str]:
    manifest = tradeoff_manifest(wildcards.model)
    files = []
    for entry in manifest["variants"]:
        files += [entry["model"], entry["ppl"], *entry["benchmarks"].values()]
        files += [entry["plan"]] if "plan" in entry else []
    return files


rule aggregate:
    input:
        tradeoff_inputs,
    output:
        csv=report(f"{RESULTS}/tradeoff.csv", caption="../report/tradeoff.rst", category="Tradeoff"),
        markdown=f"{RESULTS}/tradeoff.md",
        sources=f"{RESULTS}/tradeoff.sources.json",
    params:
        manifest=lambda wildcards: json.dumps(tradeoff_manifest(wildcards.model), sort_keys=True),
    log:
        f"{RESULTS}/logs/aggregate.log",
    resources:
        mem_mb=1000,
    conda:
        "../../envs/core.yaml"
    shell:
        "{CLI} aggregate --manifest {params.manifest:q} --csv {output.csv} --markdown {output.markdown} > {log} 2>&1"
