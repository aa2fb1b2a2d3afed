# Shared helpers: config validation, paths, the variant grid, resources, the CLI every rule calls.
# Plain Python (no torch): it runs on every Snakemake invocation, dry runs included.
import json
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
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:  # a local path, not org/name
        if not (Path(source).expanduser() / "config.json").is_file():
            raise WorkflowError(f"invalid config:\n  model.source: {source!r} is not a model folder "
                                "(no config.json there); give a local HF folder, a hub id or embedded:smollm2-135m")


check_config(config)

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
VARIANT_PATTERN = r"(?P<criterion>[a-z]+)-(?P<strategy>[a-z]+)-r(?P<ratio>[0-9]+(?:\.[0-9]+)?)"


def variant_id(criterion: str, strategy: str, ratio: float) -> str:
    """Readable, stable ids: taylor-inverse-r0.20 (more digits only when the ratio needs them)."""
    return f"{criterion}-{strategy}-r{ratio:.2f}" if round(ratio, 2) == ratio else f"{criterion}-{strategy}-r{ratio:g}"


def parse_variant(variant: str) -> dict:
    match = re.fullmatch(VARIANT_PATTERN, variant)
    return {**match.groupdict(), "ratio": float(match["ratio"])}


PLANS = config["plans"]
PRUNED_VARIANTS = sorted(
    {variant_id(c, s, r) for r in PLANS["ratios"] for c in PLANS["criteria"] for s in PLANS["strategies"]}
    | {variant_id(b["criterion"], b["strategy"], b["ratio"]) for b in PLANS["baselines"]}
)
VARIANTS = ["dense", *PRUNED_VARIANTS]
CRITERIA = sorted({parse_variant(variant)["criterion"] for variant in PRUNED_VARIANTS})
# layer scores the importance stage computes: those asked for, plus the one plans are built from
LAYER_CRITERIA = sorted(set(config["importance"]["layer_criteria"]) | {PLANS["layer_criterion"]})

wildcard_constraints:
    model=re.escape(MODEL),
    calib=re.escape(CALIB),
    criterion="|".join(("taylor", "magnitude", "activation", "random")),
    variant="dense|" + VARIANT_PATTERN.replace("?P<criterion>", "").replace("?P<strategy>", "").replace("?P<ratio>", ""),


def model_path(model: str, variant: str) -> str:
    """The dense staged folder for 'dense', the pruned checkpoint otherwise."""
    return f"resources/models/{model}" if variant == "dense" else f"results/{model}/pruned/{variant}"


def model_dir(wildcards) -> str:
    return model_path(wildcards.model, wildcards.variant)


def plan_args(variant: str) -> str:
    """Every plan setting as CLI flags: one string param, so any change re-runs the plan and what follows."""
    parsed = parse_variant(variant)
    flags = {
        "--ratio": parsed["ratio"],
        "--strategy": parsed["strategy"],
        "--alpha": PLANS["alpha"],
        "--min-rate": PLANS["min_rate"],
        "--max-rate": PLANS["max_rate"],
        "--channel-multiple": PLANS["channel_multiple"],
        "--layer-criterion": PLANS["layer_criterion"],
    }
    if PLANS["attn_ratio"] is not None:
        flags["--attn-ratio"] = PLANS["attn_ratio"]
    if PLANS["mlp_ratio"] is not None:
        flags["--mlp-ratio"] = PLANS["mlp_ratio"]
    if PLANS["protect"]:
        flags["--protect"] = ",".join(map(str, sorted(PLANS["protect"])))
    return " ".join(f"{flag} {value}" for flag, value in flags.items())


# ------------------------------------------------------------------------------------------ resources
HEAVY_THREADS = config["resources"]["threads"]


def model_mb(path: str) -> float:
    """Size of a model folder's weights in MB; before staging, the config's estimate."""
    folder = Path(path)
    weights = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        return float(config["resources"]["model_mb"])
    return sum(file.stat().st_size for file in weights) / 1e6


def mem_mb(factor: float, base_mb: int = 1500):
    """mem_mb = (base + factor x model size) x attempt: a job killed for memory is retried with more."""
    return lambda wildcards, input, attempt: int((base_mb + factor * model_mb(input.model)) * attempt)


def gpu_resources() -> dict:
    """`gpu: 1` (and the Slurm GPU model, if configured) for GPU stages when the device is cuda."""
    if config["device"] != "cuda":
        return {}
    return {"gpu": 1, **({"gpu_model": config["gpu_model"]} if config["gpu_model"] else {})}


# ------------------------------------------------------------------------------------------ the CLI
def _python() -> str:
    """With --sdm conda the rule's environment provides python; otherwise the interpreter running Snakemake."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return "python"
    return sys.executable


# Rules write "{CLI} <stage> ...": the shell text Snakemake hashes stays the same on every machine, while
# PYTHONPATH makes the package importable from this checkout even inside conda environments.
CLI = f"PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}} {shlex.quote(_python())} -m gqa_prune.cli"
