# calibration blocks -> importance/<calib>-<criterion>/{units.safetensors, scores.json}. The expensive
# stage: plans of every ratio and strategy reuse it, so changing a plan setting never re-runs it. A mixture of
# experts has one folder, importance/<calib>-experts/ (experts.safetensors, experts.json): every expert
# criterion folds the statistics of that one pass (forward only, or with a backward per batch where an expert
# criterion needs gradients: taylor, fisher).
rule importance:
    input:
        model=STAGED,
        calib=f"{RESULTS}/calib/{{calib}}.safetensors",
    output:
        directory(f"{RESULTS}/importance/{{calib}}-{{criterion}}"),
    params:
        criterion=lambda wildcards: expert_gradient_flag() if wildcards.criterion == EXPERTS_MODE else f"--criterion {wildcards.criterion}",
        layer_criteria=",".join(LAYER_CRITERIA),
        batch_size=config["importance"]["batch_size"],
        # the seed only matters to the random criterion; other criteria ignore a change of it
        seed=lambda wildcards: config["importance"]["seed"] if wildcards.criterion == "random" else 0,
        checkpointing="--gradient-checkpointing" if config["importance"]["gradient_checkpointing"] else "",
        # loss curves per unit kind (what hybrid plans price kinds by), with the plans' MLP width step
        curves=cli_flags({
            "--no-curves": not config["importance"]["curves"],
            "--curve-blocks": config["importance"]["curve_blocks"] if config["importance"]["curves"] else None,
            "--channel-multiple": PLANS["channel_multiple"] if config["importance"]["curves"] else None,
        }),
        device=config["device"],
        dtype=config["model"]["dtype"],
    log:
        f"{RESULTS}/logs/importance/{{calib}}-{{criterion}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/importance/{{calib}}-{{criterion}}.tsv"
    threads: HEAVY_THREADS
    retries: RETRIES
    resources:
        runtime=RUNTIME["importance"],
        mem_mb=mem_mb(factor=4.0),
        **gpu_resources(),
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli --threads {threads} importance --model {input.model} --calib {input.calib}"
        " {params.criterion} --layer-criteria {params.layer_criteria} --batch-size {params.batch_size}"
        " --seed {params.seed} {params.checkpointing} {params.curves} --device {params.device} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"
