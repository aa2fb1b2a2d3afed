# pruned checkpoint -> recovered/<pruned>-lora-<lm|kd>/: LoRA on every projection, merged; same format.
rule recover:
    input:
        model=lambda wildcards: model_path(wildcards.model, parent_variant(wildcards.variant)),
        blocks=f"{RESULTS}/calib/{RECOVERY['data']['name']}.safetensors",
        teacher=lambda wildcards: STAGED.format(model=wildcards.model)
        if parse_variant(wildcards.variant)["recovery"] == "kd"
        else [],
    output:
        directory(f"{RESULTS}/recovered/{{variant}}"),
    params:
        settings=lambda wildcards: recovery_args(parse_variant(wildcards.variant)["recovery"]),
        teacher=lambda wildcards, input: f"--teacher {input.teacher}" if input.teacher else "",
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/recover/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/recover/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["recover"],
        mem_mb=mem_mb(factor=6.0),  # student + adapters + optimizer + activations, and the kd teacher
        **gpu_resources(),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} recover --model {input.model} --train-blocks {input.blocks} {params.teacher}"
        " {params.settings} --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
