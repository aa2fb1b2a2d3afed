# a model (any variant) -> eval/<variant>/lm_eval.json (lm-eval tasks, for the variants in eval.apply_to)
# and eval/<variant>/efficiency.json (every variant: cheap, and it places each one on the size/speed fronts).
EVAL = config["eval"]
_GGUF_NAMED = [name for name in EVAL["apply_to"] if name in GGUF_VARIANTS]
if _GGUF_NAMED:
    raise WorkflowError(f"invalid config:\n  eval.apply_to: {_GGUF_NAMED[0]!r} is a GGUF variant; lm-eval runs model "
                        "folders (GGUF variants get perplexity and llama.cpp speed)")
EVALUATED_VARIANTS = chosen(EVAL["apply_to"], [v for v in VARIANTS if v not in GGUF_VARIANTS], "eval.apply_to")


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


def efficiency_args(variant: str) -> str:
    """Latency settings: eval.efficiency for model folders, gguf.efficiency (llama-bench's sizes) for GGUF files."""
    settings = GGUF["efficiency"] if parse_variant(variant)["gguf"] else EVAL["efficiency"]
    return cli_flags({f"--{key.replace('_', '-')}": value for key, value in settings.items()})


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
