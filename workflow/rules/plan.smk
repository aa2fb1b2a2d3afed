# importance scores -> plans/<variant>.json (+ PNG): cheap; one per ratio x criterion x strategy.
rule plan:
    input:
        importance=lambda wildcards: importance_dir(wildcards.model, wildcards.variant),
    output:
        plan=f"{RESULTS}/plans/{{variant}}.json",
        plot=report(
            f"{RESULTS}/plans/{{variant}}.png",
            caption="../report/plan.rst",
            category="Plans",
            labels={"variant": "{variant}"},
        ),
    params:
        settings=lambda wildcards: plan_args(wildcards.variant),
    log:
        f"{RESULTS}/logs/plan/{{variant}}.log",
    retries: RETRIES
    resources:
        runtime=RUNTIME["plan"],
        mem_mb=1000,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m gqa_prune.cli plan --importance {input.importance} {params.settings}"
        " --out {output.plan} --plot {output.plot} > {log} 2>&1"
