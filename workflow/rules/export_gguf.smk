# a model folder (dense, pruned or recovered) -> gguf/<variant>-gguf-<type>.gguf: one file llama.cpp runs.


rule export_gguf:
    input:
        model=lambda wildcards: model_path(wildcards.model, parent_variant(wildcards.variant)),
    output:
        f"{RESULTS}/gguf/{{variant}}.gguf",
    wildcard_constraints:
        variant=rf".+-gguf-(?:{'|'.join(GGUF_TYPES)})",
    params:
        gguf_type=lambda wildcards: parse_variant(wildcards.variant)["gguf"],
    log:
        f"{RESULTS}/logs/export_gguf/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/export_gguf/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["export_gguf"],
        mem_mb=mem_mb(factor=3.0),
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} export-gguf --model {input.model} --type {params.gguf_type}"
        " --out {output} > {log} 2>&1"
