# gqa-prune workflow: importance scores -> pruning plans -> pruned checkpoints -> LoRA recovery -> INT4/INT8
# quantization (GPTQ, GGUF for llama.cpp) -> perplexity, lm-eval tasks, efficiency -> tradeoff table with Pareto fronts.
#   snakemake --cores 2                      the embedded default (config/config.yaml), offline, on CPU
#   snakemake --profile slurm --configfile config/examples/llama-3.1-8b.yaml
# Every stage setting reaches its rule through params:, so Snakemake re-runs exactly what a change touches.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"  # validates the config first, before any job
include: "workflow/rules/stage.smk"
include: "workflow/rules/calib.smk"
include: "workflow/rules/importance.smk"
include: "workflow/rules/learn_masks.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/recover.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/export_gguf.smk"
include: "workflow/rules/ppl.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        expand(rules.aggregate.output, model=MODEL),  # every output: a missing plot re-runs aggregate
    default_target: True


onsuccess:
    table = Path(f"results/{MODEL}/tradeoff.md")
    if table.is_file():
        print(f"\n{table.read_text()}\ntradeoff table: {table} (CSV: {table.with_suffix('.csv')})")
