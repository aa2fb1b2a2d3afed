# a model (any variant) -> eval/<variant>/lm_eval.json (lm-eval tasks, for the variants in eval.apply_to)
# and eval/<variant>/efficiency.json (every variant: cheap, and it places each one on the size/speed fronts).
EVALUATED_VARIANTS = evaluated_variants()


rule evaluate:
    input:
        model=model_dir,
    output:
        f"{RESULTS}/eval/{{variant}}/lm_eval.json",
    params:
        tasks=",".join(f"{task}={limit}" if limit else task for task, limit in sorted(EVAL["tasks"].items())),
        batch_size=EVAL["batch_size"],
        max_length=f"--max-length {EVAL['max_length']}" if EVAL["max_length"] else "",
        data_dir=DATA_DIR_ARG,
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/evaluate/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["evaluate"],
        mem_mb=mem_mb(factor=1.5),
        **gpu_resources(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} evaluate --model {input.model} --tasks {params.tasks} {params.data_dir}"
        " {params.max_length} --batch-size {params.batch_size} --device {params.device} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"


# latency is timed with every core of the job to itself: threads = resources.threads keeps jobs from overlapping
rule efficiency:
    input:
        model=model_dir,
    output:
        f"{RESULTS}/eval/{{variant}}/efficiency.json",
    params:
        settings=lambda wildcards: efficiency_args(wildcards.variant),
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/efficiency/{{variant}}.log",
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["efficiency"],
        mem_mb=mem_mb(factor=1.5),
        **gpu_resources(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} efficiency --model {input.model} {params.settings}"
        " --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
