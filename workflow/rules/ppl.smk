# a model (dense or pruned) -> eval/<variant>/ppl.json: WikiText-2 perplexity, window and tokens stated.
rule ppl:
    input:
        model=model_dir,
    output:
        f"{RESULTS}/eval/{{variant}}/ppl.json",
    params:
        window=f"--window {config['eval']['ppl']['window']}" if config["eval"]["ppl"]["window"] else "",
        max_tokens=(
            f"--max-tokens {config['eval']['ppl']['max_tokens']}" if config["eval"]["ppl"]["max_tokens"] else ""
        ),
        batch_size=config["eval"]["ppl"]["batch_size"],
        data_dir=DATA_DIR_ARG,
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/ppl/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ppl/{{variant}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["ppl"],
        mem_mb=mem_mb(factor=1.5),
        **gpu_resources(),
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} ppl --model {input.model} {params.data_dir} {params.window} {params.max_tokens}"
        " --batch-size {params.batch_size} --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
