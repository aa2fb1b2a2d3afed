# model (dense, pruned or recovered) -> quantized/<variant>-<method>-w<bits>g<group>/: GPTQ-format INT weights.


def quantize_args(quant: str) -> str:
    """CLI flags of one quantization method; calibration-only settings are passed to GPTQ only, so
    changing them never re-runs the round-to-nearest jobs."""
    method = QUANT_METHODS[quant]
    gptq = method["method"] == "gptq"
    return cli_flags({
        "--method": method["method"],
        "--bits": method["bits"],
        "--group-size": method["group_size"],
        "--asym": not QUANTIZATION["sym"],
        "--kernel": QUANTIZATION["kernel"],
        "--desc-act": QUANTIZATION["desc_act"] if gptq else None,
        "--n-samples": QUANTIZATION["n_samples"] if gptq else None,
        "--batch-size": QUANTIZATION["batch_size"] if gptq else None,
    })


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
        "{CLI} --threads {threads} quantize --model {input.model} {params.calib} {params.settings}"
        " --out {output} > {log} 2>&1"
