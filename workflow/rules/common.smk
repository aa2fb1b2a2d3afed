# Shared helpers: config validation, paths, the variant grid, resources, the CLI every rule calls.
# Plain Python (no torch): it runs on every Snakemake invocation, dry runs included.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

REPO = Path(workflow.basedir)
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
EMBEDDED_MODELS = ("smollm2-135m",)


# ------------------------------------------------------------------------------------------ validation
def _key_path(error) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe(error) -> str:
    value, limit = error.instance, error.validator_value
    if error.validator == "enum":
        return f"{value!r} is not allowed; allowed: {', '.join(map(str, limit))}"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        return {"minimum": f"{value} is below the minimum {limit}", "exclusiveMinimum": f"{value} must be > {limit}",
                "maximum": f"{value} is above the maximum {limit}", "exclusiveMaximum": f"{value} must be < {limit}",
                }[error.validator]
    if error.validator == "oneOf" and error.context:  # e.g. a ratio or null: report the ratio's complaint
        return _describe(error.context[0]) + " (or null)"
    return error.message


def check_config(config: dict) -> None:
    """Fail before any job with one line per problem: the key path, the value and what is allowed."""
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: _key_path(e))
    if errors:
        raise WorkflowError("invalid config:\n" + "\n".join(f"  {_key_path(e)}: {_describe(e)}" for e in errors))
    validate(config, schema=str(SCHEMA))  # fills the schema's defaults in
    source = config["model"]["source"]
    if source.startswith("embedded:"):
        if source.removeprefix("embedded:") not in EMBEDDED_MODELS:
            raise WorkflowError(f"invalid config:\n  model.source: {source!r} is not one of "
                                + ", ".join(f"embedded:{name}" for name in EMBEDDED_MODELS))
    elif source.startswith((".", "~")) or Path(source).is_absolute() or source.count("/") != 1:  # a path, not org/name
        if not (Path(source).expanduser() / "config.json").is_file():
            raise WorkflowError(f"invalid config:\n  model.source: {source!r} is not a model folder "
                                "(no config.json there); give a local HF folder, a hub id or embedded:smollm2-135m")


def _model_layers(source: str) -> int | None:
    """Decoder layers of the configured model, where knowable before staging (local folders, the embedded default)."""
    if source == "embedded:smollm2-135m":
        return 30
    for folder in (Path(source).expanduser(), REPO / "resources" / "models" / config["model"]["name"]):
        try:
            return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def check_config_values(config: dict) -> None:
    """What the schema cannot say: finite numbers, consistent bounds, paths that exist, protect in range."""
    import math

    problems = []
    plans = config["plans"]
    ratios = [("plans.ratios", r) for r in plans["ratios"]] + [(f"plans.baselines[{i}].ratio", b["ratio"]) for i, b in enumerate(plans["baselines"])]
    for key in ("attn_ratio", "mlp_ratio", "alpha", "min_rate", "max_rate"):
        if plans.get(key) is not None:
            ratios.append((f"plans.{key}", plans[key]))
    problems += [f"{key}: {value!r} is not a finite number" for key, value in ratios if not math.isfinite(value)]
    if math.isfinite(plans["min_rate"]) and math.isfinite(plans["max_rate"]) and plans["min_rate"] > plans["max_rate"]:
        problems.append(f"plans.min_rate: {plans['min_rate']} is above plans.max_rate {plans['max_rate']}")
    layers = _model_layers(config["model"]["source"])
    if layers is not None:
        problems += [f"plans.protect: layer {layer} does not exist (the model has layers 0..{layers - 1})"
                     for layer in plans["protect"] if layer >= layers]  # fmt: skip
    if config["data_dir"] is not None:
        data_dir = Path(config["data_dir"]).expanduser()
        data_dir = data_dir if data_dir.is_absolute() else REPO / data_dir
        if not data_dir.is_dir():
            problems.append(f"data_dir: {config['data_dir']!r} is not a folder (resolved: {data_dir})")
    learn = config["learn_masks"]
    if learn["warmup_steps"] > learn["steps"]:
        problems.append(f"learn_masks.warmup_steps: {learn['warmup_steps']} is above learn_masks.steps {learn['steps']}")
    if problems:
        raise WorkflowError("invalid config:\n" + "\n".join(f"  {problem}" for problem in problems))


check_config(config)
check_config_values(config)

# ------------------------------------------------------------------------------------------ paths
MODEL = config["model"]["name"]
CALIB = config["calibration"]["name"]
STAGED = "resources/models/{model}"
RESULTS = "results/{model}"


def resolved_data_dir() -> str | None:
    data_dir = config["data_dir"]
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    return str(path if path.is_absolute() else (REPO / path).resolve())


DATA_DIR = resolved_data_dir()
DATA_DIR_ARG = f"--data-dir {shlex.quote(DATA_DIR)}" if DATA_DIR else ""

# ------------------------------------------------------------------------------------------ the grid
# A variant id reads left to right: what was pruned, how it was recovered, how it was quantized:
#   dense | taylor-inverse-r0.20 | taylor-inverse-r0.20-lora-kd | taylor-inverse-r0.20-lora-kd-gptq-w4g64
#   | taylor-inverse-r0.20-lora-kd-gguf-q4_k_m (a GGUF file for llama.cpp)
PRUNED_PATTERN = r"[a-z][a-z0-9]*-[a-z]+-r[0-9]+(?:\.[0-9]+)?"  # <criterion>-<strategy or mode>-r<ratio> (l0)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")  # gqa_prune.choices.GGUF_TYPES
VARIANT_PATTERN = (
    rf"(?P<prune>dense|{PRUNED_PATTERN})(?:-lora-(?P<recovery>lm|kd))?"
    rf"(?:-(?P<quant>(?:gptq|rtn)-w[0-9]+g[0-9]+)|-gguf-(?P<gguf>{'|'.join(GGUF_TYPES)}))?"
)


MODES_BY_NAME = ("depth", "hybrid", "learned")  # plan modes named in ids; width plans are named by their strategy
LEARNED = "l0"  # learned masks: always mode learned (l0-learned-r0.20), from importance/<data>-l0-r<ratio>/


def grid_middles(criterion: str, middles) -> list[str]:
    """The strategies/modes a criterion's variants take: learned masks are only ever reproduced (mode learned)."""
    return ["learned"] if criterion == LEARNED else list(middles)


def variant_id(criterion: str, strategy_or_mode: str, ratio: float) -> str:
    """Readable, stable ids: taylor-inverse-r0.20 (a width plan and its strategy), taylor-depth-r0.20,
    taylor-hybrid-r0.20; more digits only when the ratio needs them, all of them (repr), so that two
    different ratios never share an id."""
    digits = f"{ratio:.2f}" if round(ratio, 2) == ratio else repr(float(ratio))
    if "e" in digits:  # repr writes tiny ratios with an exponent, which ids do not take
        digits = f"{ratio:.17f}".rstrip("0")
    return f"{criterion}-{strategy_or_mode}-r{digits}"


def parse_variant(variant: str) -> dict:
    """prune / recovery / quant parts of a variant id, plus criterion, mode, strategy and ratio of a pruned one."""
    parts = re.fullmatch(VARIANT_PATTERN, variant).groupdict()
    if parts["prune"] != "dense":
        criterion, middle, ratio = parts["prune"].split("-")
        mode = middle if middle in MODES_BY_NAME else "width"
        parts.update(criterion=criterion, mode=mode, strategy=None if mode != "width" else middle, ratio=float(ratio[1:]))
    return parts


def quant_id(method: dict) -> str:
    return f"{method['method']}-w{method['bits']}g{method['group_size']}"


def chosen(apply_to: list[str], candidates: list[str], key: str) -> list[str]:
    """The candidates named by `apply_to` ("all" = every one); a name not in the grid is a config error."""
    if "all" in apply_to:
        return list(candidates)
    unknown = [name for name in apply_to if name not in candidates]
    if unknown:
        raise WorkflowError(f"invalid config:\n  {key}: {unknown[0]!r} is not a variant of this grid; "
                            f"choose from all, {', '.join(candidates)}")
    return [name for name in candidates if name in apply_to]


PLANS = config["plans"]
RECONSTRUCTION = config["reconstruction"]
RECOVERY = config["recovery"]
QUANTIZATION = config["quantization"]
GRID_MIDDLES = [
    *(PLANS["strategies"] if "width" in PLANS["modes"] else []), *(m for m in PLANS["modes"] if m != "width")
]
_ALL_RATIOS = [*PLANS["ratios"], *(b["ratio"] for b in PLANS["baselines"])]
_SAME_ID = {}
for _ratio in _ALL_RATIOS:
    _other = _SAME_ID.setdefault(variant_id("x", "y", _ratio), _ratio)
    if _other != _ratio:
        raise WorkflowError(f"invalid config:\n  plans.ratios: {_other!r} and {_ratio!r} would share a variant id")
PRUNED_VARIANTS = sorted(
    {variant_id(c, m, r) for r in PLANS["ratios"] for c in PLANS["criteria"] for m in grid_middles(c, GRID_MIDDLES)}
    | {variant_id(b["criterion"], grid_middles(b["criterion"], [b.get("mode", "width") if b.get("mode", "width") != "width" else b.get("strategy", "inverse")])[0], b["ratio"])
       for b in PLANS["baselines"]}
)  # fmt: skip
RECOVERED_VARIANTS = [
    f"{variant}-lora-{loss}"
    for variant in (chosen(RECOVERY["apply_to"], PRUNED_VARIANTS, "recovery.apply_to") if RECOVERY["methods"] else [])
    for loss in RECOVERY["methods"]
]
QUANT_METHODS = {quant_id(method): method for method in QUANTIZATION["methods"]}
QUANTIZED_VARIANTS = [
    f"{base}-{quant}"
    for base in (
        chosen(QUANTIZATION["apply_to"], ["dense", *PRUNED_VARIANTS, *RECOVERED_VARIANTS], "quantization.apply_to")
        if QUANT_METHODS
        else []
    )
    for quant in QUANT_METHODS
]
GGUF = config["gguf"]
GGUF_VARIANTS = [
    f"{base}-gguf-{gguf_type}"
    for base in (
        chosen(GGUF["apply_to"], ["dense", *PRUNED_VARIANTS, *RECOVERED_VARIANTS], "gguf.apply_to")
        if GGUF["types"]
        else []
    )
    for gguf_type in GGUF["types"]
]
VARIANTS = ["dense", *PRUNED_VARIANTS, *RECOVERED_VARIANTS, *QUANTIZED_VARIANTS, *GGUF_VARIANTS]
CRITERIA = sorted({parse_variant(variant)["criterion"] for variant in PRUNED_VARIANTS})
# layer scores the importance stage computes: those asked for, plus the one plans are built from
LAYER_CRITERIA = sorted(set(config["importance"]["layer_criteria"]) | {PLANS["layer_criterion"]})
# token-block sets the calib job can make: importance (and GPTQ) calibration, and recovery training text
TEXT_SETS = {config["calibration"]["name"]: config["calibration"], RECOVERY["data"]["name"]: RECOVERY["data"]}
if len(TEXT_SETS) < 2:
    raise WorkflowError("invalid config:\n  recovery.data.name: must differ from calibration.name")

wildcard_constraints:
    model=re.escape(MODEL),
    calib="|".join(map(re.escape, TEXT_SETS)),
    criterion="|".join(("taylor", "fisher", "magnitude", "activation", "random")),
    variant=re.sub(r"\?P<\w+>", "", VARIANT_PATTERN),


def model_path(model: str, variant: str) -> str:
    """Where a variant's model lives: a staged, pruned, recovered or quantized folder, or a GGUF file."""
    parts = parse_variant(variant)
    if parts["gguf"]:
        return f"results/{model}/gguf/{variant}.gguf"
    if parts["quant"]:
        return f"results/{model}/quantized/{variant}"
    if parts["recovery"]:
        return f"results/{model}/recovered/{variant}"
    return f"resources/models/{model}" if variant == "dense" else f"results/{model}/pruned/{variant}"


def model_dir(wildcards) -> str:
    return model_path(wildcards.model, wildcards.variant)


def parent_variant(variant: str) -> str:
    """The variant a recovered, quantized or GGUF one was made from."""
    parts = parse_variant(variant)
    if parts["gguf"]:
        return variant.removesuffix(f"-gguf-{parts['gguf']}")
    if parts["quant"]:
        return variant.removesuffix(f"-{parts['quant']}")
    return parts["prune"]


def cli_flags(flags: dict) -> str:
    """CLI flags as one string param: a change of any value re-runs the rule and what follows."""
    text = []
    for flag, value in flags.items():
        if value is True:
            text.append(flag)
        elif value is not None and value is not False:  # identity: 0 and 0.0 are real values
            text.append(f"{flag} {value}")
    return " ".join(text)


LEARN = config["learn_masks"]
LEARN_DATA = (config["calibration"] if LEARN["data"] == "calibration" else RECOVERY["data"])["name"]


def importance_dir(model: str, variant: str) -> str:
    """The importance folder a plan reads: per criterion, or for learned masks per ratio (masks fix the size)."""
    parsed = parse_variant(variant)
    if parsed["criterion"] == LEARNED:
        ratio = variant.rpartition("-r")[2]
        return f"results/{model}/importance/{LEARN_DATA}-{LEARNED}-r{ratio}"
    return f"results/{model}/importance/{CALIB}-{parsed['criterion']}"


def plan_args(variant: str) -> str:
    """Every plan setting as CLI flags."""
    parsed = parse_variant(variant)
    return cli_flags({
        "--ratio": parsed["ratio"],
        "--mode": parsed["mode"],  # always explicit: the CLI's default mode is hybrid
        "--strategy": parsed["strategy"],
        "--alpha": PLANS["alpha"],
        "--min-rate": PLANS["min_rate"],
        "--max-rate": PLANS["max_rate"],
        "--channel-multiple": PLANS["channel_multiple"],
        "--layer-criterion": PLANS["layer_criterion"],
        "--attn-ratio": PLANS["attn_ratio"] if parsed["mode"] == "width" else None,
        "--mlp-ratio": PLANS["mlp_ratio"] if parsed["mode"] == "width" else None,
        "--protect": ",".join(map(str, sorted(PLANS["protect"]))) or None,
    })


EVAL = config["eval"]


def evaluated_variants() -> list[str]:
    """The variants eval.apply_to sends through lm-eval: model folders only (GGUF files are refused by name)."""
    named = [name for name in EVAL["apply_to"] if name in GGUF_VARIANTS]
    if named:
        raise WorkflowError(f"invalid config:\n  eval.apply_to: {named[0]!r} is a GGUF variant; lm-eval runs model "
                            "folders (GGUF variants get perplexity and llama.cpp speed)")
    return chosen(EVAL["apply_to"], [v for v in VARIANTS if v not in GGUF_VARIANTS], "eval.apply_to")


def efficiency_args(variant: str) -> str:
    """Latency settings: eval.efficiency for model folders, gguf.efficiency (llama-bench's sizes) for GGUF files."""
    settings = GGUF["efficiency"] if parse_variant(variant)["gguf"] else EVAL["efficiency"]
    return cli_flags({f"--{key.replace('_', '-')}": value for key, value in settings.items()})


# ------------------------------------------------------------------------------------------ rule helpers
def quantize_args(quant: str) -> str:
    """CLI flags of one quantization method; calibration-only settings are passed to GPTQ only, so
    changing them never re-runs the round-to-nearest jobs."""
    method = QUANT_METHODS[quant]
    gptq = method["method"] == "gptq"
    return cli_flags({
        "--method": method["method"],
        "--bits": method["bits"],
        "--group-size": method["group_size"],
        "--asym": not QUANTIZATION["sym"],
        "--kernel": QUANTIZATION["kernel"],
        "--desc-act": QUANTIZATION["desc_act"] if gptq else None,
        "--n-samples": QUANTIZATION["n_samples"] if gptq else None,
        "--batch-size": QUANTIZATION["batch_size"] if gptq else None,
    })


def tradeoff_manifest(model: str) -> dict:
    """Which artefact each figure of the table comes from (written beside the table as tradeoff.sources.json)."""
    entries = []
    for variant in VARIANTS:
        parts = parse_variant(variant)
        benchmarks = {"ppl": f"results/{model}/benchmarks/ppl/{variant}.tsv"}
        entry = {"variant": variant, "model": model_path(model, variant), "ppl": f"results/{model}/eval/{variant}/ppl.json",
                 "recovery": parts["recovery"] or "none", "quant": parts["quant"] or "none"}
        if parts["gguf"]:  # a file: provenance is its source folder's, speed is llama.cpp's
            entry["quant"] = f"gguf-{parts['gguf']}"
            entry["provenance"] = f"{model_path(model, parent_variant(variant))}/gqa_prune.json"
            benchmarks["export_gguf"] = f"results/{model}/benchmarks/export_gguf/{variant}.tsv"
        if parts["prune"] == "dense":
            benchmarks["stage"] = f"results/{model}/benchmarks/stage.tsv"
        else:
            entry["ratio"] = parts["ratio"]
            entry["plan"] = f"results/{model}/plans/{parts['prune']}.json"
            if parts["criterion"] == LEARNED:  # the masks' training is this variant's scoring cost
                scoring = Path(importance_dir(model, parts["prune"])).name
                benchmarks["learn_masks"] = f"results/{model}/benchmarks/learn_masks/{scoring}.tsv"
            else:
                benchmarks["importance"] = f"results/{model}/benchmarks/importance/{CALIB}-{parts['criterion']}.tsv"
            benchmarks["prune"] = f"results/{model}/benchmarks/prune/{parts['prune']}.tsv"
        if parts["recovery"]:
            benchmarks["recover"] = f"results/{model}/benchmarks/recover/{parts['prune']}-lora-{parts['recovery']}.tsv"
        if parts["quant"]:
            benchmarks["quantize"] = f"results/{model}/benchmarks/quantize/{variant}.tsv"
        entry["efficiency"] = f"results/{model}/eval/{variant}/efficiency.json"
        if variant in EVALUATED_VARIANTS:  # never a GGUF one
            entry["lm_eval"] = f"results/{model}/eval/{variant}/lm_eval.json"
            benchmarks["evaluate"] = f"results/{model}/benchmarks/evaluate/{variant}.tsv"
        entry["benchmarks"] = benchmarks
        entries.append(entry)
    ppl = config["eval"]["ppl"]
    notes = [
        "PPL: WikiText-2 raw test, GPTQ-style text, non-overlapping windows of "
        f"{ppl['window'] or 'min(2048, model max)'} tokens, "
        + (f"first {ppl['max_tokens']:,} tokens." if ppl["max_tokens"] else "the whole test set."),
        "linear_bits: storage bits per weight of the decoder's linear layers (scales, zeros, indices included); "
        "bytes: weight files on disk.",
        f"Wall times (*_s) and peak resident memory (*_max_rss_mb) are Snakemake benchmarks on device '{config['device']}'.",
    ]
    if EVALUATED_VARIANTS:
        limits = ", ".join(f"{task} {limit or 'all'}" for task, limit in sorted(EVAL["tasks"].items()))
        source = "offline copies of lm-eval's tasks (lm-eval's prompts and metrics)" if DATA_DIR else "lm-eval's hub tasks"
        latency = EVAL["efficiency"]
        notes += [
            f"Tasks: {source}, zero-shot; items scored: {limits} (wikitext: documents). mean_acc averages acc_norm "
            "(acc for winogrande) over the multiple-choice tasks.",
            f"Latency on '{config['device']}' with {HEAVY_THREADS} threads at batch 1: prefill of {latency['prompt_tokens']} "
            f"tokens, decode of {latency['decode_tokens']} tokens, median of {latency['repeats']} after "
            f"{latency['warmup']} warm-up; peak_memory_mb is the resident-memory growth while loading and timing.",
            "pareto_*: on the front of weight bytes vs mean accuracy, bytes vs perplexity, decode speed vs accuracy.",
        ]
    if GGUF_VARIANTS:
        speed = GGUF["efficiency"]
        notes.append(
            "GGUF variants (-gguf-<type>) run in llama.cpp (llama-cpp-python): PPL from its logits on the same windows "
            f"(f32 KV cache); prompt_tokens_per_s over {speed['prompt_tokens']} tokens and decode_tokens_per_s at batch "
            f"1 over {speed['decode_tokens']} tokens from an empty context ({HEAVY_THREADS} threads, f16 KV cache, "
            f"median of {speed['repeats']}); decode_fraction_of_ideal = measured / (read bandwidth measured in the same "
            "job / bytes read per token); linear_bits = the file's bits per weight of its matrices, bytes = the file."
        )
    if RECOVERED_VARIANTS:
        notes.append(f"Recovery: LoRA r={RECOVERY['rank']}, {RECOVERY['steps']} steps of {RECOVERY['batch_size']} x "
                     f"{RECOVERY['data']['seq_len']} tokens of {RECOVERY['data']['source']}, lr {RECOVERY['lr']}; "
                     "lm = language-modelling loss, kd = distillation from the dense model's logits.")
    if config["model"]["source"] == "embedded:smollm2-135m":
        notes.append("SmolLM2-135M weights are dequantized from 4-bit GGUF (Q4_1): re-quantizing them to 4 bits "
                     "looks unrealistically good.")
    return {"model": model, "variants": entries, "notes": notes}


def tradeoff_inputs(wildcards) -> list[str]:
    manifest = tradeoff_manifest(wildcards.model)
    files = []
    for entry in manifest["variants"]:
        files += [entry["model"], entry["ppl"], *entry["benchmarks"].values()]
        files += [entry[key] for key in ("plan", "lm_eval", "efficiency") if key in entry]
    return files


# ------------------------------------------------------------------------------------------ resources
# Resources live in each rule's own definition, not in profiles/default; Snakemake lets a workflow profile replace a
# global profile's keys wholesale, so a set-resources there would silently drop a site's own settings.
HEAVY_THREADS = config["resources"]["threads"]
RETRIES = config["resources"]["retries"]
RUNTIME = {  # minutes; generous for an 8B model on one GPU
    "stage": 120, "calib": 30, "importance": 360, "plan": 10, "prune": 60, "recover": 720, "quantize": 240,
    "ppl": 180, "evaluate": 480, "efficiency": 30, "aggregate": 10, "learn_masks": 720, "export_gguf": 120,
    **config["resources"].get("runtime", {}),
}  # fmt: skip


def model_mb(path: str) -> float:
    """Size of a model folder's weights (or a GGUF file) in MB; before staging, the config's estimate."""
    folder = Path(path)
    weights = [folder] if folder.is_file() else list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        return float(config["resources"]["model_mb"])
    return sum(file.stat().st_size for file in weights) / 1e6


def mem_mb(factor: float, base_mb: int | None = None):
    """mem_mb = (base + factor x model size) x attempt: a job killed for memory is retried with more."""
    base = config["resources"]["mem_base_mb"] if base_mb is None else base_mb
    return lambda wildcards, input, attempt: int((base + factor * model_mb(input.model)) * attempt)


def gpu_resources() -> dict:
    """`gpu: 1` (and the Slurm GPU model, if configured) for GPU stages when the device is cuda."""
    if config["device"] != "cuda":
        return {}
    return {"gpu": 1, **({"gpu_model": config["gpu_model"]} if config["gpu_model"] else {})}


# ------------------------------------------------------------------------------------------ the CLI
# Rules run "python -m gqa_prune.cli <stage> ...": the shell text (what Snakemake's code trigger hashes) is
# the same on every machine and names nothing outside the rule. Which python and which package that is, is set
# here in the environment every job inherits; each Slurm job runs its own Snakemake, which sets it again.
# PYTHONPATH puts this checkout's package first, even inside conda environments (--sdm conda), where the
# environment's own python leads PATH; otherwise the interpreter running Snakemake does.
def _job_environment() -> dict[str, str]:
    paths = {"PYTHONPATH": str(REPO)}
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        paths["PATH"] = str(Path(sys.executable).parent)
    # first, once: a Slurm job's Snakemake inherits these and sets them again, so nothing grows
    return {
        name: os.pathsep.join(dict.fromkeys([value, *filter(None, os.environ.get(name, "").split(os.pathsep))]))
        for name, value in paths.items()
    }


os.environ.update(_job_environment())
