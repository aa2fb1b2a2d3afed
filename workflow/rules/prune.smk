# dense model + plan -> pruned/<variant>/: an HF checkpoint, physically smaller (surgery runs on CPU).
rule prune:
    input:
        model=STAGED,
        plan=f"{RESULTS}/plans/{{variant}}.json",
    output:
        directory(f"{RESULTS}/pruned/{{variant}}"),
    params:
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/prune/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prune/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["prune"],
        mem_mb=mem_mb(factor=2.5),
    conda:
        "../../envs/core.yaml"
    shell:
        "{CLI} --threads {threads} prune --model {input.model} --plan {input.plan} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"
