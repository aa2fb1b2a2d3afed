# training blocks -> importance/<data>-l0-r<ratio>/: GQA-tied hard-concrete masks learned to that ratio
# (criterion l0, Sheared-LLaMA style); plans of variants l0-learned-r<ratio> keep exactly their units.
# Masks fix the size, so there is one folder per ratio (unlike importance, which every ratio shares).
rule learn_masks:
    input:
        model=STAGED,
        blocks=f"{RESULTS}/calib/{{calib}}.safetensors",
    output:
        directory(f"{RESULTS}/importance/{{calib}}-l0-r{{ratio}}"),
    wildcard_constraints:
        ratio=r"[0-9]+(?:\.[0-9]+)?",
    params:
        settings=lambda wildcards: learn_masks_args(float(wildcards.ratio)),
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/learn_masks/{{calib}}-l0-r{{ratio}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/learn_masks/{{calib}}-l0-r{{ratio}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["learn_masks"],
        mem_mb=mem_mb(factor=6.0),  # model + activations of a backward pass (+ optimizer state when training weights)
        **gpu_resources(),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} learn-masks --model {input.model} --calib {input.blocks} --ratio {wildcards.ratio}"
        " {params.settings} --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
