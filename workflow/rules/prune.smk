# dense model + plan -> pruned/<variant>/: an HF checkpoint, physically smaller, its surviving output
# projections refit by least squares on the calibration blocks (reconstruction; on the GPU with cuda).
rule prune:
    input:
        model=STAGED,
        plan=f"{RESULTS}/plans/{{variant}}.json",
        calib=[f"{RESULTS}/calib/{CALIB}.safetensors"] if RECONSTRUCTION["enabled"] else [],
    output:
        directory(f"{RESULTS}/pruned/{{variant}}"),
    params:
        dtype=config["model"]["dtype"],
        device=config["device"],
        reconstruction=reconstruction_args(),
        calib=lambda wildcards, input: f"--calib {input.calib}" if RECONSTRUCTION["enabled"] else "",
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
