# dense model + plan -> pruned/<variant>/: an HF checkpoint, physically smaller, its surviving output
# projections refit by least squares on the calibration blocks (reconstruction; on the GPU with cuda). Expert
# plans are refit where they cut GQA groups or channels; whole experts leave nothing to refit.
rule prune:
    input:
        model=STAGED,
        plan=f"{RESULTS}/plans/{{variant}}.json",
        calib=lambda wildcards: [f"{RESULTS}/calib/{CALIB}.safetensors"] if refits(wildcards.variant) else [],
    output:
        directory(f"{RESULTS}/pruned/{{variant}}"),
    params:
        dtype=config["model"]["dtype"],
        device=config["device"],
        reconstruction=lambda wildcards: prune_refit_args(wildcards.variant),
        calib=lambda wildcards, input: f"--calib {input.calib}" if refits(wildcards.variant) else "",
    log:
        f"{RESULTS}/logs/prune/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prune/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["prune"],
        mem_mb=mem_mb(factor=2.5),
        **(gpu_resources() if RECONSTRUCTION["enabled"] else {}),
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} prune --model {input.model} --plan {input.plan} {params.calib}"
        " {params.reconstruction} --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
