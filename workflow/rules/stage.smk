# model source -> resources/models/<model>/ (HF folder, safetensors): the only rule that may touch the hub.
rule stage:
    output:
        directory(STAGED),
    params:
        source=config["model"]["source"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/stage.log",
    benchmark:
        f"{RESULTS}/benchmarks/stage.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["stage"],
        mem_mb=lambda wildcards, attempt: config["resources"]["stage_mem_mb"] * attempt,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} stage --source {params.source:q} --dtype {params.dtype} --out {output} > {log} 2>&1"
