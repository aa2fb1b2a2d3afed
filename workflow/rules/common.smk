# Shared helpers: config validation, paths, the variant grid, resources, the CLI every rule calls.
# Plain Python (no torch): it runs on every Snakemake invocation, dry runs included.
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

REPO = Path(workflow.basedir)
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
EMBEDDED_MODELS = ("smollm2-135m",)

# The library's settings, importable without torch: each job's settings are built and checked here by the same
# classes and validate() the CLI uses. This checkout's package, as the jobs import it (PYTHONPATH, below).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from gqa_prune.errors import GqaPruneError
from gqa_prune.mask_settings import MaskSettings
from gqa_prune.quant_settings import QuantSettings
from gqa_prune.settings import (
    ExpertPlanSettings,
    PlanSettings,
    ReconstructionSettings,
    RecoverySettings,
    default_of,
)


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


# JSON Schema counts 10.0 as an integer, but the CLI's integer options refuse "10.0": so does the config
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


def check_config(config: dict) -> None:
    """Fail before any job with one line per problem: the key path, the value and what is allowed."""
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(StrictValidator(schema).iter_errors(config), key=lambda e: _key_path(e))
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


def settings_problems() -> list[str]:
    """Every CLI call the grid plans, checked by the library's own validate() (what the CLI runs before any
    work): one line per refused config key and message, `key: the library's message (the jobs)`."""
    layers = _model_layers(config["model"]["source"])
    refused = {}  # (config key, message) -> the jobs refusing it
    for job, settings, section, keys in planned_settings():
        try:
            settings.validate(layers) if isinstance(settings, PlanSettings) else settings.validate()
        except GqaPruneError as error:
            field = getattr(error, "field", "")
            key = keys.get(field) or (f"{section}.{field}" if field else section)
            refused.setdefault((key, str(error)), []).append(job)
    return [f"{key}: {message} ({jobs[0]}" + (f" and {len(jobs) - 1} more)" if len(jobs) > 1 else ")")
            for (key, message), jobs in refused.items()]  # fmt: skip


def check_config_values(config: dict) -> None:
    """What the schema cannot say, before any job: each job's settings pass the library's checks, ratios give
    distinct variant ids, hybrid plans have loss curves to price by, data_dir exists."""
    problems = settings_problems()
    plans = config["plans"]
    ratios = [r for r in (*plans["ratios"], *(b["ratio"] for b in plans["baselines"])) if math.isfinite(r)]
    ids = {}
    for ratio in ratios:  # (nan, which would share the id "rnan", the library refuses above)
        other = ids.setdefault(variant_id("x", "y", ratio), ratio)
        if other != ratio:
            problems.append(f"plans.ratios: {other!r} and {ratio!r} would share a variant id")
    hybrid = [variant for variant, (_, middle, _, _) in PRUNED.items() if middle == "hybrid"]
    if hybrid and not config["importance"]["curves"]:
        problems.append(f"importance.curves: false, but hybrid plans ({hybrid[0]}) price unit kinds by the measured "
                        "loss curves; set it true, or drop mode hybrid")  # fmt: skip
    if config["data_dir"] is not None:
        data_dir = Path(config["data_dir"]).expanduser()
        data_dir = data_dir if data_dir.is_absolute() else REPO / data_dir
        if not data_dir.is_dir():
            problems.append(f"data_dir: {config['data_dir']!r} is not a folder (resolved: {data_dir})")
    if problems:
        raise WorkflowError("invalid config:\n" + "\n".join(f"  {problem}" for problem in sorted(problems)))


check_config(config)  # check_config_values runs once the grid is known, below

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


MODES_BY_NAME = ("depth", "hybrid", "learned", "experts")  # plan modes named in ids; width plans by their strategy
EXPERTS_MODE = "experts"  # expert plans of a mixture of experts: <expert criterion>-experts-r<ratio>
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
EXPERT_PLANS = PLANS["experts"]
RECONSTRUCTION = config["reconstruction"]
RECOVERY = config["recovery"]
QUANTIZATION = config["quantization"]
EXPERT_GRADIENT_CRITERIA = ("taylor", "fisher")  # gqa_prune.choices.EXPERT_GRADIENT_CRITERIA


def expert_gradient_flag() -> str:
    """`importance --criterion taylor` on a mixture of experts records the experts' gradient scores too (one
    backward per batch): asked for only where an expert criterion of the grid needs them."""
    needed = [c for c in EXPERT_PLANS["criteria"] if c in EXPERT_GRADIENT_CRITERIA and EXPERT_PLANS["ratios"]]
    return f"--criterion {needed[0]}" if needed else ""


GRID_MIDDLES = [
    *(PLANS["strategies"] if "width" in PLANS["modes"] else []), *(m for m in PLANS["modes"] if m != "width")
]


def pruned_grid() -> dict[str, tuple[str, str, float, str]]:
    """Every pruned variant: id -> (criterion, strategy or mode, ratio, the config key of that ratio); the
    ratios x criteria x modes of `plans`, then the baselines (an id both name is the first's)."""
    sources = [(criterion, GRID_MIDDLES, ratio, f"plans.ratios[{i}]")
               for i, ratio in enumerate(PLANS["ratios"]) for criterion in PLANS["criteria"]]  # fmt: skip
    sources += [(criterion, [EXPERTS_MODE], ratio, f"plans.experts.ratios[{i}]")
                for i, ratio in enumerate(EXPERT_PLANS["ratios"]) for criterion in EXPERT_PLANS["criteria"]]  # fmt: skip
    for i, baseline in enumerate(PLANS["baselines"]):
        mode = baseline.get("mode", "width")
        middle = baseline.get("strategy", default_of(PlanSettings, "strategy")) if mode == "width" else mode
        sources.append((baseline["criterion"], [middle], baseline["ratio"], f"plans.baselines[{i}].ratio"))
    grid = {}
    for criterion, middles, ratio, key in sources:
        for middle in grid_middles(criterion, middles):
            grid.setdefault(variant_id(criterion, middle, ratio), (criterion, middle, ratio, key))
    return grid


PRUNED = pruned_grid()
PRUNED_VARIANTS = sorted(PRUNED)
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
CRITERIA = sorted({criterion for criterion, *_ in PRUNED.values()})
# layer scores the importance stage computes: those asked for, plus the one plans are built from
LAYER_CRITERIA = sorted(set(config["importance"]["layer_criteria"]) | {PLANS["layer_criterion"]})
# token-block sets the calib job can make: importance (and GPTQ) calibration, and recovery training text
TEXT_SETS = {config["calibration"]["name"]: config["calibration"], RECOVERY["data"]["name"]: RECOVERY["data"]}
if len(TEXT_SETS) < 2:
    raise WorkflowError("invalid config:\n  recovery.data.name: must differ from calibration.name")

wildcard_constraints:
    model=re.escape(MODEL),
    calib="|".join(map(re.escape, TEXT_SETS)),
    criterion="|".join(("taylor", "fisher", "magnitude", "activation", "random", EXPERTS_MODE)),
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
    if parsed["mode"] == EXPERTS_MODE:  # one pass records what every expert criterion folds
        return f"results/{model}/importance/{CALIB}-{EXPERTS_MODE}"
    return f"results/{model}/importance/{CALIB}-{parsed['criterion']}"


def refits(variant: str) -> bool:
    """Whether prune refits the variant by least squares: reconstruction on, and for an expert plan only where
    its settings cut inputs of output projections (GQA groups, shared or expert channels)."""
    if parse_variant(variant)["mode"] == EXPERTS_MODE:
        cuts = EXPERT_PLANS["width_ratio"] > 0 or EXPERT_PLANS["channel_ratio"] > 0
        return RECONSTRUCTION["enabled"] and cuts
    return RECONSTRUCTION["enabled"]


def prune_refit_args(variant: str) -> str:
    """The refit's flags for one variant's prune: an expert plan's refit takes the ridge, the choice of units
    and the batch size (it fits each cut projection to its own unpruned output)."""
    if not refits(variant):
        return ""
    if parse_variant(variant)["mode"] == EXPERTS_MODE:
        settings = reconstruction_settings()
        return cli_flags({"--ridge": settings.ridge, "--select": settings.select, "--batch-size": settings.batch_size})
    return reconstruction_args()


# ------------------------------------------------------------------------------------------ job settings
# Each CLI call's settings are built here once, as the library's own settings objects: the rules pass them on
# as flags (*_args), and check_config_values has run the library's validate() on every one the grid plans.
def plan_settings(criterion: str, middle: str, ratio: float) -> PlanSettings:
    """What `gqa-prune plan` builds from plan_args for the variant <criterion>-<strategy or mode>-r<ratio>."""
    mode = middle if middle in MODES_BY_NAME else "width"
    width = mode == "width"
    return PlanSettings(
        ratio=ratio,
        mode=mode,
        strategy=middle if width else default_of(PlanSettings, "strategy"),
        attn_ratio=PLANS["attn_ratio"] if width else None,  # a hand split is for width plans only
        mlp_ratio=PLANS["mlp_ratio"] if width else None,
        alpha=PLANS["alpha"],
        min_rate=PLANS["min_rate"],
        max_rate=PLANS["max_rate"],
        protected_layers=tuple(sorted(PLANS["protect"])),
        channel_multiple=PLANS["channel_multiple"],
        layer_criterion=PLANS["layer_criterion"],
        criterion=criterion,
    )


def expert_plan_settings(criterion: str, ratio: float) -> ExpertPlanSettings:
    """What `gqa-prune plan --expert-ratio` builds from plan_args for the variant <criterion>-experts-r<ratio>."""
    return ExpertPlanSettings(
        expert_ratio=ratio,
        criterion=criterion,
        allocation=EXPERT_PLANS["allocation"],
        channel_ratio=EXPERT_PLANS["channel_ratio"],
        channel_multiple=PLANS["channel_multiple"],
        seed=EXPERT_PLANS["seed"],
        width_ratio=EXPERT_PLANS["width_ratio"],
        whole_layers=EXPERT_PLANS["whole_layers"],
    )


def plan_args(variant: str) -> str:
    """Every plan setting as CLI flags."""
    parsed = parse_variant(variant)
    if parsed["mode"] == EXPERTS_MODE:
        settings = expert_plan_settings(parsed["criterion"], parsed["ratio"])
        return cli_flags({
            "--expert-ratio": settings.expert_ratio,
            "--expert-criterion": settings.criterion,
            "--experts": settings.allocation,
            "--expert-channel-ratio": settings.channel_ratio,
            "--ratio": settings.width_ratio or None,
            "--whole-layers": settings.whole_layers,
            "--channel-multiple": settings.channel_multiple,
            "--seed": settings.seed,
        })
    settings = plan_settings(parsed["criterion"], parsed["strategy"] or parsed["mode"], parsed["ratio"])
    return cli_flags({
        "--ratio": settings.ratio,
        "--mode": settings.mode,  # always explicit: the CLI's default mode is hybrid
        "--strategy": settings.strategy if settings.mode == "width" else None,
        "--alpha": settings.alpha,
        "--min-rate": settings.min_rate,
        "--max-rate": settings.max_rate,
        "--channel-multiple": settings.channel_multiple,
        "--layer-criterion": settings.layer_criterion,
        "--attn-ratio": settings.attn_ratio,
        "--mlp-ratio": settings.mlp_ratio,
        "--protect": ",".join(map(str, settings.protected_layers)) or None,
    })


def mask_settings(ratio: float) -> MaskSettings:
    """What `gqa-prune learn-masks --ratio <ratio>` builds from learn_masks_args (criterion l0)."""
    train = LEARN["train_weights"] != "none"
    return MaskSettings(
        ratio=ratio,
        steps=LEARN["steps"],
        batch_size=LEARN["batch_size"],
        warmup_steps=LEARN["warmup_steps"],
        mask_lr=LEARN["mask_lr"],
        lambda_lr=LEARN["lambda_lr"],
        lambda2_init=LEARN["lambda2_init"],
        kinds=tuple(LEARN["kinds"]),
        channel_multiple=PLANS["channel_multiple"],  # learned MLP widths step as plans do
        train_weights=LEARN["train_weights"],
        weight_lr=LEARN["weight_lr"] if train else default_of(MaskSettings, "weight_lr"),
        seed=LEARN["seed"],
        gradient_checkpointing=LEARN["gradient_checkpointing"],
    )


def learn_masks_args(ratio: float) -> str:
    """Every learn-masks setting but the ratio (the rule passes its wildcard) as CLI flags."""
    settings = mask_settings(ratio)
    return cli_flags({
        "--steps": settings.steps,
        "--batch-size": settings.batch_size,
        "--warmup-steps": settings.warmup_steps,
        "--mask-lr": settings.mask_lr,
        "--lambda-lr": settings.lambda_lr,
        "--lambda2-init": settings.lambda2_init,
        "--kinds": ",".join(settings.kinds),
        "--channel-multiple": settings.channel_multiple,
        "--train-weights": settings.train_weights,
        "--weight-lr": settings.weight_lr if settings.train_weights != "none" else None,
        "--seed": settings.seed,
        "--gradient-checkpointing": settings.gradient_checkpointing,
    })


def reconstruction_settings() -> ReconstructionSettings:
    """What `gqa-prune prune --calib ...` builds from reconstruction_args (the refit, when enabled)."""
    return ReconstructionSettings(
        ridge=RECONSTRUCTION["ridge"],
        target=RECONSTRUCTION["target"],
        select=RECONSTRUCTION["select"],
        batch_size=RECONSTRUCTION["batch_size"],
        inputs=RECONSTRUCTION["inputs"],
    )


def reconstruction_args() -> str:
    """The refit's CLI flags; none when reconstruction is off (prune then gets no --calib either)."""
    if not RECONSTRUCTION["enabled"]:
        return ""
    settings = reconstruction_settings()
    return cli_flags({
        "--ridge": settings.ridge,
        "--reconstruct-target": settings.target,
        "--select": settings.select,
        "--batch-size": settings.batch_size,
        "--refit-inputs": settings.inputs,
    })


def recovery_settings(loss: str) -> RecoverySettings:
    """What `gqa-prune recover --loss <loss>` builds from recovery_args."""
    return RecoverySettings(
        loss=loss,
        rank=RECOVERY["rank"],
        alpha=RECOVERY["alpha"],
        dropout=RECOVERY["dropout"],
        lr=RECOVERY["lr"],
        steps=RECOVERY["steps"],
        batch_size=RECOVERY["batch_size"],
        warmup_steps=RECOVERY["warmup_steps"],
        temperature=RECOVERY["temperature"] if loss == "kd" else default_of(RecoverySettings, "temperature"),
        seed=RECOVERY["seed"],
        gradient_checkpointing=RECOVERY["gradient_checkpointing"],
        router=RECOVERY["router"],
    )


def recovery_args(loss: str) -> str:
    """Every recovery setting as CLI flags; the temperature only for kd (lm runs ignore it)."""
    settings = recovery_settings(loss)
    return cli_flags({
        "--loss": settings.loss,
        "--rank": settings.rank,
        "--alpha": settings.alpha,
        "--dropout": settings.dropout,
        "--lr": settings.lr,
        "--steps": settings.steps,
        "--batch-size": settings.batch_size,
        "--warmup-steps": settings.warmup_steps,
        "--temperature": settings.temperature if settings.loss == "kd" else None,
        "--seed": settings.seed,
        "--gradient-checkpointing": settings.gradient_checkpointing,
        "--router": settings.router,
    })


def quant_settings(quant: str) -> QuantSettings:
    """What `gqa-prune quantize` builds from quantize_args for one method (<method>-w<bits>g<group_size>)."""
    method = QUANT_METHODS[quant]
    return QuantSettings(
        method=method["method"],
        bits=method["bits"],
        group_size=method["group_size"],
        desc_act=QUANTIZATION["desc_act"] if method["method"] == "gptq" else False,
        sym=QUANTIZATION["sym"],
        kernel=QUANTIZATION["kernel"],
    )


def quantize_args(quant: str) -> str:
    """CLI flags of one quantization method; calibration-only settings are passed to GPTQ only, so
    changing them never re-runs the round-to-nearest jobs."""
    settings = quant_settings(quant)
    gptq = settings.method == "gptq"
    return cli_flags({
        "--method": settings.method,
        "--bits": settings.bits,
        "--group-size": settings.group_size,
        "--asym": not settings.sym,
        "--kernel": settings.kernel,
        "--desc-act": settings.desc_act if gptq else None,
        "--n-samples": QUANTIZATION["n_samples"] if gptq else None,
        "--batch-size": QUANTIZATION["batch_size"] if gptq else None,
    })


def planned_settings() -> Iterator[tuple[str, object, str, dict[str, str]]]:
    """Each CLI call the grid plans, as (the job, its settings, their config section, {field: config key} where
    a field's key is not <section>.<field>)."""
    plan_keys = {"protected_layers": "plans.protect", "strategy": "plans.strategies", "mode": "plans.modes"}
    expert_keys = {"criterion": "plans.experts.criteria", "allocation": "plans.experts.allocation",
                   "channel_ratio": "plans.experts.channel_ratio", "channel_multiple": "plans.channel_multiple",
                   "seed": "plans.experts.seed"}  # fmt: skip
    for variant, (criterion, middle, ratio, ratio_key) in PRUNED.items():
        if middle == EXPERTS_MODE:
            settings = expert_plan_settings(criterion, ratio)
            yield f"gqa-prune plan of {variant}", settings, "plans.experts", {**expert_keys, "expert_ratio": ratio_key}
            continue
        plan = plan_settings(criterion, middle, ratio)
        yield f"gqa-prune plan of {variant}", plan, "plans", {**plan_keys, "ratio": ratio_key}
        if criterion == LEARNED:  # masks learned first, to the ratio in the variant's id (the rule's wildcard)
            masks = mask_settings(float(variant.rpartition("-r")[2]))
            keys = {"ratio": ratio_key, "channel_multiple": "plans.channel_multiple"}
            yield f"gqa-prune learn-masks for {variant}", masks, "learn_masks", keys
    if RECONSTRUCTION["enabled"]:
        yield "gqa-prune prune", reconstruction_settings(), "reconstruction", {}
    for loss in RECOVERY["methods"] if RECOVERED_VARIANTS else []:
        yield f"gqa-prune recover --loss {loss}", recovery_settings(loss), "recovery", {"loss": "recovery.methods"}
    for i, method in enumerate(QUANTIZATION["methods"] if QUANTIZED_VARIANTS else []):
        keys = {field: f"quantization.methods[{i}].{field}" for field in ("method", "bits", "group_size")}
        yield f"gqa-prune quantize {quant_id(method)}", quant_settings(quant_id(method)), "quantization", keys


check_config_values(config)


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
                scoring = Path(importance_dir(model, parts["prune"])).name
                benchmarks["importance"] = f"results/{model}/benchmarks/importance/{scoring}.tsv"
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
