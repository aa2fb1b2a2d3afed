# every variant's artefacts -> tradeoff.{csv,md}: one row per variant, each number read from a named file.


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
        "python -m gqa_prune.cli aggregate --manifest {params.manifest:q} --csv {output.csv} > {log} 2>&1"
