# text source -> calib/<calib>.safetensors: n_samples blocks of seq_len tokens, a seeded sample.
rule calib:
    input:
        model=STAGED,
    output:
        f"{RESULTS}/calib/{{calib}}.safetensors",
    params:
        source=config["calibration"]["source"],
        text_field=config["calibration"]["text_field"],
        split=config["calibration"]["split"],
        n_samples=config["calibration"]["n_samples"],
        seq_len=config["calibration"]["seq_len"],
        seed=config["calibration"]["seed"],
        data_dir=DATA_DIR_ARG,
    log:
        f"{RESULTS}/logs/calib/{{calib}}.log",
    resources:
        mem_mb=mem_mb(factor=0.0, base_mb=2000),
    conda:
        "../../envs/core.yaml"
    shell:
        "{CLI} calib --model {input.model} --source {params.source:q} {params.data_dir}"
        " --text-field {params.text_field:q} --split {params.split:q} --n-samples {params.n_samples}"
        " --seq-len {params.seq_len} --seed {params.seed} --out {output} > {log} 2>&1"
