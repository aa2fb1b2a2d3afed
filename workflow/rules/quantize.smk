# model (dense, pruned or recovered) -> quantized/<variant>-<method>-w<bits>g<group>/: GPTQ-format INT weights.


rule quantize:
    input:
        model=lambda wildcards: model_path(wildcards.model, parent_variant(wildcards.variant)),
        calib=lambda wildcards: f"results/{wildcards.model}/calib/{CALIB}.safetensors"
        if QUANT_METHODS[parse_variant(wildcards.variant)["quant"]]["method"] == "gptq"
        else [],
    output:
        directory(f"{RESULTS}/quantized/{{variant}}"),
    params:
        settings=lambda wildcards: quantize_args(parse_variant(wildcards.variant)["quant"]),
        calib=lambda wildcards, input: f"--calib {input.calib}" if input.calib else "",
    log:
        f"{RESULTS}/logs/quantize/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["quantize"],
        mem_mb=mem_mb(factor=3.0),
        **gpu_resources(),
    conda:
        "../../envs/quantize.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} quantize --model {input.model} {params.calib} {params.settings}"
        " --out {output} > {log} 2>&1"
