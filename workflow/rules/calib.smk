# text source -> calib/<calib>.safetensors: n_samples blocks of seq_len tokens, a seeded sample. Two sets:
# `calibration` (importance scores, GPTQ) and `recovery.data` (LoRA training text); both C4 by default.
rule calib:
    input:
        model=STAGED,
    output:
        f"{RESULTS}/calib/{{calib}}.safetensors",
    params:
        source=lambda wildcards: TEXT_SETS[wildcards.calib]["source"],
        text_field=lambda wildcards: TEXT_SETS[wildcards.calib]["text_field"],
        split=lambda wildcards: TEXT_SETS[wildcards.calib]["split"],
        n_samples=lambda wildcards: TEXT_SETS[wildcards.calib]["n_samples"],
        seq_len=lambda wildcards: TEXT_SETS[wildcards.calib]["seq_len"],
        seed=lambda wildcards: TEXT_SETS[wildcards.calib]["seed"],
        data_dir=DATA_DIR_ARG,
    log:
        f"{RESULTS}/logs/calib/{{calib}}.log",
    retries: RETRIES
    resources:
        runtime=RUNTIME["calib"],
        mem_mb=mem_mb(factor=0.0),
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli calib --model {input.model} --source {params.source:q} {params.data_dir}"
        " --text-field {params.text_field:q} --split {params.split:q} --n-samples {params.n_samples}"
        " --seq-len {params.seq_len} --seed {params.seed} --out {output} > {log} 2>&1"
