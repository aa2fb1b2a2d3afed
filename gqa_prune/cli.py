"""``gqa-prune <stage> ...``: one sub-command per workflow rule, usable without Snakemake.

Every sub-command validates its input first, writes its output atomically (temporary path, then rename)
and reports bad input as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import GqaPruneError


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (the value, and what is allowed)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ratio(text: str) -> float:
    from .allocation import check_rate_bounds

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio {text!r} is not a number") from None
    try:
        check_rate_bounds(value, "ratio")
    except GqaPruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parse_layer_list(text: str) -> tuple[int, ...]:
    """'0,1,28-29' -> (0, 1, 28, 29); '' -> ()."""
    layers: set[int] = set()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        try:
            if "-" in part:
                first, last = (int(value) for value in part.split("-", 1))
            else:
                first = last = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"layer list {text!r} must look like '0,1,28-29'") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(
                f"layer range {part!r} in {text!r} is empty or negative: write ranges low-high, e.g. '0,1,28-29'"
            )
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


def _csv(choices: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(filter(None, (name.strip() for name in text.split(","))))
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(choices)}")
        return names

    return parse


# ----------------------------------------------------------------------------------------------- commands
def cmd_stage(args: argparse.Namespace) -> None:
    from .sources import stage

    stage(args.source, args.out, dtype=args.dtype)
    print(f"staged {args.source} -> {args.out}")


def cmd_calib(args: argparse.Namespace) -> None:
    from .data import calibration_blocks, read_source, resolve_text_source, save_calibration
    from .sources import check_length, load_tokenizer

    text_source = resolve_text_source(
        args.source,
        args.data_dir,
        text_field=args.text_field,
        split=args.split,
        dataset_config=args.dataset_config,
        data_files=args.data_files,
    )
    check_length(args.model, args.seq_len, "--seq-len")
    tokenizer = load_tokenizer(args.model)
    documents = read_source(text_source)
    blocks = calibration_blocks(tokenizer, documents, args.n_samples, args.seq_len, args.seed)
    metadata = {
        "source": text_source.source,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "documents_available": len(documents),
        "vocab_size": len(tokenizer),
    }
    save_calibration(args.out, blocks, metadata)
    print(f"calibration: {args.n_samples} blocks x {args.seq_len} tokens from {text_source.source} -> {args.out}")


def cmd_importance(args: argparse.Namespace) -> None:
    from . import importance, scores
    from .choices import DEFAULT_UNIT_CRITERION
    from .data import load_calibration
    from .moe import moe_family_for
    from .sources import load_model

    blocks, calibration = load_calibration(args.calib)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if moe_family_for(model.config) is not None:
        _expert_importance(args, model, blocks, calibration)
        return
    result = importance.score(
        model,
        blocks,
        args.criterion or DEFAULT_UNIT_CRITERION,
        layer_criteria=args.layer_criteria,
        batch_size=args.batch_size,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        curves=not args.no_curves,
        curve_blocks=args.curve_blocks,
        channel_multiple=args.channel_multiple,
    )
    result.info.update(calibration=calibration)
    scores.save(result, args.out)
    curves = f"; loss curves of {len(result.curves)} kinds" if result.curves else ""
    criterion = args.criterion or DEFAULT_UNIT_CRITERION
    print(f"importance ({criterion}; layers and sublayers: {', '.join(result.structural)}{curves}) -> {args.out}")


def _expert_importance(args: argparse.Namespace, model, blocks, calibration: dict) -> None:
    """importance of a mixture-of-experts model: the expert statistics every expert criterion folds."""
    from . import expert_scores
    from .choices import EXPERT_CRITERIA, EXPERT_GRADIENT_CRITERIA
    from .expert_importance import needs_gradients, score_experts

    gradients = needs_gradients(args.criterion)
    result = score_experts(
        model, blocks, batch_size=args.batch_size, curves=not args.no_curves, curve_blocks=args.curve_blocks,
        gradients=gradients,
    )  # fmt: skip
    result.info.update(calibration=calibration)
    expert_scores.save(result, args.out)
    moe_layers = len(result.geometry.moe_layers)
    curves = f"; loss curves of {len(result.curves)} layers" if result.curves else ""
    measured = "routed count, gate, output norm, gradients" if gradients else "routed count, gate, output norm"
    criteria = [name for name in EXPERT_CRITERIA if gradients or name not in EXPERT_GRADIENT_CRITERIA]
    print(
        f"importance (experts of {moe_layers} MoE layers: {measured} -- {', '.join(criteria)}; choose with plan "
        f"--expert-criterion{curves}) -> {args.out}"
    )


def _expert_plan(args: argparse.Namespace) -> None:
    from . import expert_scores
    from .expert_plan import build_expert_plan
    from .settings import ExpertPlanSettings

    if args.expert_ratio is None and (args.expert_channel_ratio or args.ratio):
        args.expert_ratio = 0.0  # channels or GQA groups only
    if args.expert_ratio is None:
        raise GqaPruneError(
            f"{args.importance} holds expert scores: give --expert-ratio (fraction of experts to remove) and/or "
            "--ratio (fraction of every attention layer's GQA groups and every shared MLP's channels)"
        )
    settings = ExpertPlanSettings(
        expert_ratio=args.expert_ratio, criterion=args.expert_criterion, allocation=args.experts,
        channel_ratio=args.expert_channel_ratio, channel_multiple=args.channel_multiple, seed=args.seed,
        width_ratio=args.ratio or 0.0, whole_layers=args.whole_layers,
    )  # fmt: skip
    settings.validate()  # before reading anything
    scores = expert_scores.load(args.importance)
    plan = build_expert_plan(scores, settings)
    plan.save(args.out)
    if args.plot:
        from .plotting import plot_expert_plan

        plot_expert_plan(plan, args.plot)
    summary = plan.summary()
    channels = f", expert channels {plan.channel_ratio}" if plan.channels is not None else ""
    groups = (
        f", GQA groups {summary['kv_groups_before']} -> {summary['kv_groups_after']}" if plan.groups is not None else ""
    )
    if plan.shared_channels is not None:
        groups += f", shared-MLP channels {summary['shared_channels_before']} -> {summary['shared_channels_after']}"
    if plan.removed_layers:
        groups += f", layers {summary['layers_before']} -> {summary['layers_after']}"
    if plan.removed_sublayers:
        groups += f", {summary['sublayers_removed']} single attention / MoE blocks removed"
    print(
        f"plan (experts {plan.allocation}, {plan.criterion}{channels}): remove {summary['achieved_expert_ratio']:.2%} "
        f"of the experts ({summary['experts_before']} -> {summary['experts_after']}{groups}; "
        f"{summary['params_before']:,} -> {summary['params_after']:,} parameters) -> {args.out}"
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from . import scores as stored_scores
    from .expert_scores import is_expert_folder
    from .mask_settings import TRAINED_WEIGHTS_DIR
    from .planning import PlanSettings, build_plan
    from .plotting import plot_plan

    if is_expert_folder(args.importance):
        _expert_plan(args)
        return
    scores = stored_scores.load(args.importance)
    if args.expert_ratio is not None or args.expert_channel_ratio or args.whole_layers:
        option = next(
            name
            for name, given in (
                ("--expert-ratio", args.expert_ratio is not None),
                ("--expert-channel-ratio", args.expert_channel_ratio),
                ("--whole-layers", args.whole_layers),
            )
            if given
        )  # fmt: skip
        raise GqaPruneError(
            f"{option}: the model scored in {args.importance} has no mixture-of-experts layers "
            f"(family {scores.geometry.family})"
        )
    if args.ratio is None:
        raise GqaPruneError("plan: give --ratio (fraction of attention+MLP parameters to remove, in [0, 1))")
    trained = args.importance / TRAINED_WEIGHTS_DIR
    settings = PlanSettings(
        ratio=args.ratio,
        mode=args.mode or ("learned" if scores.masks else None),  # learned masks: keep exactly their units
        attn_ratio=args.attn_ratio,
        mlp_ratio=args.mlp_ratio,
        strategy=args.strategy,
        alpha=args.alpha,
        min_rate=args.min_rate,
        max_rate=args.max_rate,
        protected_layers=args.protect,
        channel_multiple=args.channel_multiple,
        layer_criterion=args.layer_criterion,
        criterion=scores.criterion,
        weights=str(trained.resolve()) if (trained / "config.json").is_file() else None,
    )
    plan = build_plan(scores, settings)
    plan.save(args.out)
    if args.plot:
        plot_plan(plan, args.plot)
    summary = plan.param_summary()
    structural = (
        f"; {summary['layers_removed']} layers, {summary['attn_sublayers_removed']} attention and "
        f"{summary['mlp_sublayers_removed']} MLP sublayers removed"
        if settings.mode != "width"
        else ""
    )
    print(
        f"plan ({settings.mode}): remove {summary['achieved_ratio']:.2%} of attention+MLP parameters "
        f"(attention {summary['achieved_attn_ratio']:.1%}, MLP {summary['achieved_mlp_ratio']:.1%}{structural}; "
        f"{summary['params_before']:,} -> {summary['params_after']:,}) -> {args.out}"
    )


def cmd_learn_masks(args: argparse.Namespace) -> None:
    from .data import load_calibration
    from .learn_masks import learn_masks, save_learned
    from .mask_settings import TRAINED_WEIGHTS_DIR, MaskSettings
    from .sources import load_model, load_tokenizer, read_provenance

    settings = MaskSettings(
        ratio=args.ratio, steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
        mask_lr=args.mask_lr, lambda_lr=args.lambda_lr, lambda2_init=args.lambda2_init,
        init_log_alpha=args.init_log_alpha, beta=args.beta, lower=args.limits[0], upper=args.limits[1],
        kinds=args.kinds, channel_multiple=args.channel_multiple, train_weights=args.train_weights,
        weight_lr=args.weight_lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    settings.validate()  # before loading anything
    blocks, calibration = load_calibration(args.calib)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    result = learn_masks(model, blocks, settings)
    result.scores.info.update(calibration=calibration)
    source = read_provenance(args.model).get("source", str(args.model))
    tokenizer = load_tokenizer(args.model) if result.trained_model is not None else None
    save_learned(result, args.out, tokenizer=tokenizer, provenance={"source": source})
    info = result.scores.info["l0"]
    weights = f"; trained weights in {args.out / TRAINED_WEIGHTS_DIR}" if result.trained_model is not None else ""
    print(
        f"learned masks (l0, {settings.steps} steps): expected ratio {info['expected_ratio']:.4f}, deterministic "
        f"{info['achieved_ratio']:.4f} (target {settings.ratio}); loss {result.scores.calibration_loss:.4f} dense "
        f"-> {info['masked_loss']:.4f} masked{weights} -> {args.out}"
    )


def _expert_prune(args: argparse.Namespace, plan) -> None:
    from .checkpoint import save_pruned
    from .expert_surgery import apply_expert_plan
    from .sources import load_model, load_tokenizer, read_provenance

    refit = args.calib is not None and not args.no_reconstruct and plan.cuts_columns
    if refit:
        if args.refit_inputs or args.reconstruct_target != "own":
            raise GqaPruneError(
                "--refit-inputs and --reconstruct-target dense apply to dense plans; an expert plan's refit fits "
                "each cut projection to its own unpruned output"
            )
    model = load_model(args.model, dtype=args.dtype, device=args.device if refit else "cpu")
    tokenizer = load_tokenizer(args.model)
    provenance, sections = {"reconstruction": None}, []
    if refit:
        from .data import load_calibration
        from .expert_reconstruct import refit_expert_plan, summary_line

        blocks, calibration = load_calibration(args.calib)
        plan, report = refit_expert_plan(model, plan, blocks, args.ridge, args.batch_size, args.select)
        provenance["reconstruction"] = {**report, "calibration": calibration}
        sections.append(f"## Reconstruction\n\n{summary_line(report)}")
    apply_expert_plan(model, plan)
    source = read_provenance(args.model).get("source", str(args.model))
    save_pruned(model.cpu(), tokenizer, plan, args.out, source=source, provenance=provenance, card_sections=sections)
    summary = plan.summary()
    reconstruction = "refitted by least squares" if refit else "no reconstruction"
    if args.calib is not None and not plan.cuts_columns:
        reconstruction += ": the plan cuts no projection's inputs"
    print(
        f"pruned: {plan.params_before:,} -> {plan.params_after:,} parameters ({summary['experts_before']} -> "
        f"{summary['experts_after']} experts; {'stock' if plan.is_uniform else 'per-layer'} config; "
        f"{reconstruction}) -> {args.out}"
    )


def cmd_prune(args: argparse.Namespace) -> None:
    from .checkpoint import save_pruned
    from .expert_plan import ExpertPlan, load_plan
    from .sources import load_model, load_tokenizer, read_provenance
    from .surgery import apply_plan

    plan = load_plan(args.plan)
    if isinstance(plan, ExpertPlan):
        _expert_prune(args, plan)
        return
    if plan.settings.weights and Path(args.model).resolve() != Path(plan.settings.weights):
        raise GqaPruneError(
            f"plan {str(args.plan)!r} keeps units learned together with trained weights: prune those "
            f"(--model {plan.settings.weights}), not {str(args.model)!r}"
        )
    settings = None
    if args.calib is not None and not args.no_reconstruct:
        from .reconstruct import ReconstructionSettings

        settings = ReconstructionSettings(
            ridge=args.ridge,
            target=args.reconstruct_target,
            select=args.select,
            batch_size=args.batch_size,
            inputs=args.refit_inputs,
        )
        settings.validate()
    model = load_model(args.model, dtype=args.dtype, device=args.device if settings else "cpu")
    tokenizer = load_tokenizer(args.model)
    provenance, sections = {}, []
    if settings is not None:
        from .data import load_calibration
        from .reconstruct import reconstruct, summary_line

        blocks, calibration = load_calibration(args.calib)
        plan, report = reconstruct(model, plan, blocks, settings)
        report["calibration"] = calibration
        provenance["reconstruction"] = report
        sections.append(f"## Reconstruction\n\n{summary_line(report)}")
    else:
        provenance["reconstruction"] = None
    apply_plan(model, plan)
    source = read_provenance(args.model).get("source", str(args.model))
    save_pruned(model.cpu(), tokenizer, plan, args.out, source=source, provenance=provenance, card_sections=sections)
    refit = "refitted by least squares" if settings else "no reconstruction"
    print(f"pruned: {plan.params_before:,} -> {plan.params_after:,} parameters ({refit}) -> {args.out}")


def cmd_ppl(args: argparse.Namespace) -> None:
    from .atomic import write_json
    from .data import WIKITEXT_CONSTRUCTION, wikitext2_test_text
    from .perplexity import DEFAULT_WINDOW, default_window, perplexity

    text = wikitext2_test_text(args.data_dir)  # read before loading the model: a bad data_dir fails fast
    if _is_gguf(args.model):
        import torch

        from .export import llama_cpp

        limit = llama_cpp.context_length(llama_cpp.check_ours(args.model))
        if args.window and args.window > limit:
            raise GqaPruneError(f"--window {args.window} exceeds the model's {limit} positions (GGUF context_length)")
        token_ids = torch.tensor(llama_cpp.tokenize(args.model, text))
        window = args.window or min(DEFAULT_WINDOW, limit)
        result = llama_cpp.perplexity(args.model, token_ids, window, WIKITEXT_CONSTRUCTION, max_tokens=args.max_tokens)
        engine = "llama.cpp"
    else:
        from .sources import check_length, load_model, load_tokenizer

        if args.window:
            check_length(args.model, args.window, "--window")
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        tokenizer = load_tokenizer(args.model)
        token_ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
        window = args.window or default_window(model)
        result = perplexity(
            model, token_ids, window, WIKITEXT_CONSTRUCTION, max_tokens=args.max_tokens, batch_size=args.batch_size
        )
        engine = "transformers"
    record = {"model": str(args.model), "dataset": "wikitext-2-raw test", "engine": engine, **result.to_dict()}
    if args.out:
        write_json(args.out, record, "ppl")
    print(f"{args.model}: WikiText-2 {result.describe()} [{engine}]")


def _is_gguf(path: Path) -> bool:
    """A model given as a .gguf file is run by llama.cpp; anything else is a Hugging Face folder."""
    return Path(path).suffix == ".gguf"


def parse_task_limits(text: str) -> dict[str, int | None]:
    """'arc_easy=200,piqa,wikitext=4' -> {'arc_easy': 200, 'piqa': None, 'wikitext': 4} (None = every item)."""
    tasks: dict[str, int | None] = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, _, limit = part.partition("=")
        try:
            tasks[name] = int(limit) if limit else None
        except ValueError:
            raise argparse.ArgumentTypeError(f"task limit {part!r} must look like task=N") from None
    if not tasks:
        raise argparse.ArgumentTypeError(f"--tasks {text!r} names no task; give e.g. 'arc_easy=100,piqa'")
    return tasks


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .atomic import write_json
    from .evaluation import check_tasks, run_lm_eval, summarize
    from .perplexity import default_window
    from .sources import check_length, load_model, load_tokenizer

    check_tasks(args.tasks)
    if args.max_length:
        check_length(args.model, args.max_length, "--max-length")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    max_length = args.max_length or default_window(model)
    raw = run_lm_eval(model, tokenizer, args.tasks, args.data_dir, batch_size=args.batch_size, max_length=max_length)
    summary = summarize(raw, args.data_dir)
    write_json(
        args.out, {"model": str(args.model), "max_length": max_length, "summary": summary, "lm_eval": raw}, "evaluate"
    )
    for task, entry in summary.items():
        metric = "word_perplexity" if task == "wikitext" else ("acc_norm" if "acc_norm" in entry else "acc")
        print(f"{task}: {metric} {entry[metric]:.4f} ({entry['items']} items)")


def cmd_efficiency(args: argparse.Namespace) -> None:
    from .atomic import write_json

    gguf = _is_gguf(args.model)
    args.prompt_tokens = args.prompt_tokens or (512 if gguf else 256)
    args.decode_tokens = args.decode_tokens or (128 if gguf else 32)
    if gguf:
        from .export import llama_cpp

        limit = llama_cpp.context_length(llama_cpp.check_ours(args.model))
        if args.prompt_tokens + args.decode_tokens > limit:
            raise GqaPruneError(
                f"--prompt-tokens + --decode-tokens {args.prompt_tokens + args.decode_tokens} exceeds the model's "
                f"{limit} positions (GGUF context_length)"
            )
        figures = llama_cpp.speed(
            args.model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats
        )
        figures.update(engine="llama.cpp", bytes=figures["file_bytes"], linear_bits=figures["bits_per_weight"])
        write_json(args.out, {"model": str(args.model), **figures}, "efficiency")
        print(
            f"{args.model}: llama.cpp prompt {figures['prompt_tokens_per_s']:.1f} tokens/s ({args.prompt_tokens} "
            f"tokens), decode {figures['decode_tokens_per_s']:.1f} tokens/s = "
            f"{figures['decode_fraction_of_ideal']:.0%} of the memory-bound {figures['decode_ideal_tokens_per_s']:.1f}"
        )
        return
    from .efficiency import LatencySettings, measure, peak_rss_mb
    from .gptq_format import linear_bits_per_parameter
    from .report import weight_bytes
    from .sources import check_length, load_model

    settings = LatencySettings(args.prompt_tokens, args.decode_tokens, args.repeats, args.warmup)
    rss_before = peak_rss_mb()
    model = load_model(args.model, dtype=args.dtype, device=args.device)  # refuses a folder's own code first
    check_length(args.model, args.prompt_tokens + args.decode_tokens, "--prompt-tokens + --decode-tokens")
    figures = measure(model, settings, rss_before)
    figures.update(bytes=weight_bytes(args.model), linear_bits=linear_bits_per_parameter(args.model))
    write_json(args.out, {"model": str(args.model), **figures}, "efficiency")
    print(
        f"{args.model}: prefill {figures['prefill_ms']:.1f} ms ({settings.prompt_tokens} tokens), "
        f"decode {figures['decode_tokens_per_s']:.1f} tokens/s, KV {figures['kv_cache_bytes_per_token']:,} B/token"
    )


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from .export.gguf import export_gguf

    summary = export_gguf(args.model, args.out, args.type)
    print(
        f"GGUF ({summary['architecture']}, {summary['blocks']} blocks, {summary['type']}, "
        f"{summary['bytes'] / 2**20:,.1f} MiB) -> {args.out}"
    )


def cmd_plot(args: argparse.Namespace) -> None:
    from .expert_plan import ExpertPlan, load_plan
    from .plotting import plot_expert_plan, plot_plan

    plan = load_plan(args.plan)
    (plot_expert_plan if isinstance(plan, ExpertPlan) else plot_plan)(plan, args.out)
    print(f"plot -> {args.out}")


def cmd_recover(args: argparse.Namespace) -> None:
    from .data import load_calibration
    from .recovery import RecoverySettings, recover_checkpoint

    settings = RecoverySettings(
        loss=args.loss, rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, warmup_steps=args.warmup_steps, temperature=args.temperature, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, router=args.router,
    )  # fmt: skip
    settings.validate()
    if settings.loss == "kd" and args.teacher is None:
        raise GqaPruneError("--loss kd needs --teacher (the dense model folder)")
    blocks, _ = load_calibration(args.train_blocks)
    record = recover_checkpoint(
        args.model, blocks, settings, args.out, args.teacher, dtype=args.dtype, device=args.device
    )
    print(f"recovered ({settings.loss}, {settings.steps} steps, final loss {record['final_loss']:.4f}) -> {args.out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from .data import load_calibration
    from .quantize import QuantSettings, quantize_checkpoint
    from .sources import require_model_dir

    settings = QuantSettings(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=not args.asym,
        kernel=args.kernel,
    )
    settings.validate()  # before any work, as the workflow's config validation does
    require_model_dir(args.model)
    calibration = None
    if settings.method == "gptq":
        if args.calib is None:
            raise GqaPruneError("--method gptq needs --calib (calibration blocks from `gqa-prune calib`)")
        calibration = load_calibration(args.calib)[0][: args.n_samples]
    record = quantize_checkpoint(args.model, args.out, settings, calibration, batch_size=args.batch_size)
    bits = record["quantization"]["bits_per_parameter"]
    print(f"quantized ({settings.id}, {bits:.3f} bits per linear weight) -> {args.out}")


def cmd_aggregate(args: argparse.Namespace) -> None:
    from .report import write_report

    inline = args.manifest.lstrip().startswith("{")
    if not inline and not Path(args.manifest).is_file():
        raise GqaPruneError(f"manifest {args.manifest!r} is neither inline JSON nor an existing file")
    text = args.manifest if inline else Path(args.manifest).read_text(errors="replace")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise GqaPruneError(f"manifest is not valid JSON: {error}") from error
    table = write_report(manifest, args.csv)
    print(f"tradeoff table ({len(table)} variants) -> {args.csv} (+ .md, .html, .sources.json, pareto_*.png)")


def cmd_profile_install(args: argparse.Namespace) -> None:
    from .profile import install_slurm_profile

    target = install_slurm_profile(args.partition, args.account, args.gpu_model, args.dest, force=args.force)
    print(f"Slurm profile -> {target}; run the workflow with: snakemake --profile slurm")


# ----------------------------------------------------------------------------------------------- parser
def _limits(text: str) -> tuple[float, float]:
    """'-0.1,1.1' -> (-0.1, 1.1): the hard-concrete stretch limits (``MaskSettings.validate`` checks them)."""
    try:
        lower, upper = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"limits {text!r} must look like '-0.1,1.1' (l < 0 < 1 < r)") from None
    return lower, upper


def _learn_masks_parser(commands, device_options) -> None:
    """``learn-masks``: its options and defaults come from ``mask_settings.MaskSettings`` (no torch import)."""
    from .choices import UNIT_KINDS
    from .mask_settings import WEIGHT_TRAINING, MaskSettings
    from .settings import default_of

    def default(name: str):
        return default_of(MaskSettings, name)

    learn = commands.add_parser(
        "learn-masks", help="learn GQA-tied hard-concrete (L0) masks to a target size: importance folder, criterion l0"
    )
    learn.add_argument("--model", required=True, type=Path, help="model folder (from stage), dense")
    learn.add_argument("--calib", required=True, type=Path, help="training blocks (from `calib`)")
    learn.add_argument("--ratio", required=True, type=_ratio, help="fraction of attention+MLP parameters to remove")
    learn.add_argument("--steps", type=_positive_int, default=default("steps"), help="mask-training steps")
    learn.add_argument(
        "--batch-size", type=_positive_int, default=default("batch_size"), help="calibration blocks per step"
    )
    learn.add_argument(
        "--warmup-steps", type=int, default=default("warmup_steps"), help="the target rises from 0 over these steps"
    )
    learn.add_argument("--mask-lr", type=float, default=default("mask_lr"), help="Adam on the log-alphas")
    learn.add_argument("--lambda-lr", type=float, default=default("lambda_lr"), help="ascent on lambda1, lambda2")
    learn.add_argument("--lambda2-init", type=float, default=default("lambda2_init"), help="lambda2's start")
    learn.add_argument(
        "--init-log-alpha",
        type=float,
        default=default("init_log_alpha"),
        help="initial log-alpha of every mask (high: every unit starts kept)",
    )
    learn.add_argument("--beta", type=float, default=default("beta"), help="hard-concrete temperature")
    learn.add_argument(
        "--limits", type=_limits, default=(default("lower"), default("upper")), help="stretch limits l,r"
    )
    learn.add_argument(
        "--kinds", type=_csv(UNIT_KINDS), default=default("kinds"),
        help=f"unit kinds that get masks, comma-separated from {', '.join(UNIT_KINDS)} (default: all)",
    )  # fmt: skip
    learn.add_argument(
        "--channel-multiple", type=_positive_int, default=default("channel_multiple"),
        help="kept MLP widths are multiples of this",
    )  # fmt: skip
    learn.add_argument(
        "--train-weights", default=default("train_weights"), choices=WEIGHT_TRAINING,
        help="none: masks only (frozen weights); full or lora: train weights jointly (GPU), saved under OUT/model",
    )  # fmt: skip
    learn.add_argument(
        "--weight-lr",
        type=float,
        default=default("weight_lr"),
        help="learning rate of the weights (--train-weights full or lora)",
    )
    learn.add_argument(
        "--lora-rank", type=_positive_int, default=default("lora_rank"), help="LoRA rank (--train-weights lora)"
    )
    learn.add_argument(
        "--lora-alpha", type=float, default=default("lora_alpha"), help="LoRA alpha (--train-weights lora)"
    )
    learn.add_argument("--seed", type=int, default=default("seed"), help="seed of the mask noise and the batch order")
    learn.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    learn.add_argument("--out", required=True, type=Path, help="output folder (an importance folder, criterion l0)")
    device_options(learn)
    learn.set_defaults(run=cmd_learn_masks)


def build_parser() -> argparse.ArgumentParser:
    from .choices import (
        DEFAULT_EXPERT_CRITERION,
        DEFAULT_MODE,
        DEFAULT_UNIT_CRITERION,
        DEVICES,
        DTYPES,
        EXPERT_ALLOCATIONS,
        EXPERT_CRITERIA,
        GGUF_TYPES,
        LAYER_CRITERIA,
        MODES,
        RECONSTRUCTION_SELECTIONS,
        RECONSTRUCTION_TARGETS,
        STRATEGIES,
        UNIT_CRITERIA,
    )
    from .settings import (
        CURVE_TOKENS,
        IMPORTANCE_BATCH_SIZE,
        LOSSES,
        ROUTER_MODES,
        CalibrationSettings,
        PlanSettings,
        ReconstructionSettings,
        RecoverySettings,
        default_of,
    )

    layer_criteria = LAYER_CRITERIA

    parser = _OneLineParser(prog="gqa-prune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow running code shipped in a model folder (never needed for gqa-prune's own checkpoints)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    def device_options(command: argparse.ArgumentParser, device: bool = True) -> None:
        command.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weight dtype (default: as saved)")
        if device:
            command.add_argument("--device", default="auto", choices=list(DEVICES), help="default: cuda if available")

    stage = commands.add_parser("stage", help="turn a model source into a local HF folder (safetensors)")
    stage.add_argument("--source", required=True, help="hub id, local HF folder, or embedded:smollm2-135m")
    stage.add_argument("--out", required=True, type=Path, help="output model folder (safetensors)")
    device_options(stage, device=False)
    stage.set_defaults(run=cmd_stage)

    calib = commands.add_parser("calib", help="sample calibration token blocks from a text source")
    calib.add_argument("--model", required=True, type=Path, help="model folder (its tokenizer is used)")
    calib.add_argument(
        "--source", required=True, help="c4 (from --data-dir, else the hub), a .jsonl/.json/.txt file, or hf:<dataset>"
    )
    calib.add_argument("--data-dir", type=Path, default=None, help="offline data laid out like ../shared/data")
    calib.add_argument("--data-files", default=None, help="data_files of an hf: dataset (e.g. one shard)")
    calib.add_argument("--text-field", default="text", help="JSON field holding the text (.jsonl/.json sources)")
    calib.add_argument("--split", default="train", help="split of an hf: dataset")
    calib.add_argument("--dataset-config", default=None, help="config name of an hf: dataset")
    calib.add_argument(
        "--n-samples",
        type=_positive_int,
        default=default_of(CalibrationSettings, "n_samples"),
        help="blocks (default: %(default)s)",
    )
    calib.add_argument(
        "--seq-len",
        type=_positive_int,
        default=default_of(CalibrationSettings, "seq_len"),
        help="tokens per block (default: %(default)s)",
    )
    calib.add_argument(
        "--seed",
        type=int,
        default=default_of(CalibrationSettings, "seed"),
        help="seed of the sampled documents and offsets",
    )
    calib.add_argument("--out", required=True, type=Path, help="output .safetensors")
    calib.set_defaults(run=cmd_calib)

    score = commands.add_parser("importance", help="score GQA groups, MLP channels, sublayers and layers")
    score.add_argument("--model", required=True, type=Path, help="model folder (from stage)")
    score.add_argument("--calib", required=True, type=Path, help="blocks written by `calib`")
    score.add_argument(
        "--criterion",
        default=None,
        choices=list(UNIT_CRITERIA),
        help=(
            f"unit scores (default: {DEFAULT_UNIT_CRITERION}): taylor |w*dL/dw|, fisher (empirical Fisher of each "
            "unit's mask), obs (structured OBS error with the refit after it), magnitude (L1), activation "
            "(Wanda-style |w|*||x||), random (seeded); a mixture of experts gets its forward-only expert "
            "statistics, and with taylor or fisher also the experts' Taylor and Fisher scores (one backward per batch)"
        ),
    )
    score.add_argument(
        "--layer-criteria",
        type=_csv(layer_criteria),
        default=("block_influence", "activation"),
        help=f"comma-separated, from {', '.join(layer_criteria)} (removal: a forward per layer and sublayer)",
    )
    score.add_argument(
        "--curve-blocks", type=_positive_int, default=None,
        help=f"measure the per-kind loss curves (for --mode hybrid; per layer and kind for --experts per-layer) on the "
        f"first N blocks (default: as many as hold {CURVE_TOKENS:,} tokens)",
    )  # fmt: skip
    score.add_argument(
        "--no-curves", action="store_true", help="skip the loss curves (no hybrid or per-layer expert plans then)"
    )
    score.add_argument(
        "--channel-multiple",
        type=_positive_int,
        default=default_of(PlanSettings, "channel_multiple"),
        help="MLP width step the loss curves use (as plans)",
    )
    score.add_argument(
        "--batch-size", type=_positive_int, default=IMPORTANCE_BATCH_SIZE, help="calibration blocks per pass"
    )
    score.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    score.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (large models)")
    score.add_argument("--out", required=True, type=Path, help="output folder")
    device_options(score)
    score.set_defaults(run=cmd_importance)

    plan = commands.add_parser("plan", help="build a pruning plan from importance scores")
    plan.add_argument("--importance", required=True, type=Path, help="folder written by `importance`")
    plan.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help="fraction of attention+MLP parameters to remove, in [0, 1); on a mixture of experts' scores: fraction "
        "of every attention layer's GQA groups and of every shared MLP's channels",
    )
    plan.add_argument(
        "--expert-ratio",
        type=_ratio,
        default=None,
        help="mixture of experts: fraction of every MoE layer's routed experts to remove, in [0, 1)",
    )
    plan.add_argument(
        "--expert-criterion",
        default=DEFAULT_EXPERT_CRITERION,
        choices=list(EXPERT_CRITERIA),
        help=f"which experts go first (default: {DEFAULT_EXPERT_CRITERION})",
    )
    plan.add_argument(
        "--experts",
        default=EXPERT_ALLOCATIONS[0],
        choices=EXPERT_ALLOCATIONS,
        help="uniform: every MoE layer loses the same number of experts (stock config); per-layer: what the "
        "ratios remove is split between layers (and with --ratio between experts, GQA groups and shared-MLP "
        "channels) by their measured loss per parameter; ranked: experts of all layers ranked together by the "
        "criterion (per-layer counts: the project's model class)",
    )
    plan.add_argument(
        "--whole-layers",
        action="store_true",
        help="with --experts per-layer: whole decoder layers (attention, state-space or MoE) and their single blocks "
        "(an attention block where all layers share one attention type; a MoE block with its shared expert) compete "
        "too, priced by the measured loss of removing each one",
    )
    plan.add_argument(
        "--expert-channel-ratio",
        type=_ratio,
        default=0.0,
        help="fraction of the experts' intermediate channels to remove (widths in --channel-multiple): the same "
        "share of every kept expert, or with --experts per-layer that share of their parameters, priced per layer "
        "against the other kinds",
    )
    plan.add_argument("--seed", type=int, default=0, help="seed of the random expert criterion")
    plan.add_argument(
        "--mode", default=None, choices=MODES,
        help="width: GQA groups and MLP channels; depth: whole layers; hybrid: layers, sublayers, groups and "
        f"channels by measured loss per parameter (default: {DEFAULT_MODE}; width when --attn-ratio or "
        "--mlp-ratio sets a hand split)",
    )  # fmt: skip
    plan.add_argument(
        "--attn-ratio", type=_ratio, default=None, help="width mode: attention only (default: --ratio); 0 keeps it"
    )
    plan.add_argument("--mlp-ratio", type=_ratio, default=None, help="width mode: MLP only (default: --ratio)")
    plan.add_argument(
        "--strategy",
        default=default_of(PlanSettings, "strategy"),
        choices=STRATEGIES,
        help="width mode: inverse (important layers lose less), proportional, or uniform (every layer the same shape)",
    )
    plan.add_argument(
        "--alpha", type=float, default=default_of(PlanSettings, "alpha"), help="contrast between layers (0 = uniform)"
    )
    plan.add_argument(
        "--min-rate",
        type=float,
        default=default_of(PlanSettings, "min_rate"),
        help="lowest pruning rate of a layer (width mode)",
    )
    plan.add_argument(
        "--max-rate",
        type=float,
        default=default_of(PlanSettings, "max_rate"),
        help="highest pruning rate of a layer (width mode)",
    )
    plan.add_argument("--protect", type=parse_layer_list, default=(), help="layers never pruned, e.g. '0,1,28-29'")
    plan.add_argument(
        "--channel-multiple",
        type=_positive_int,
        default=default_of(PlanSettings, "channel_multiple"),
        help="kept MLP and expert widths are multiples of this",
    )
    plan.add_argument(
        "--layer-criterion",
        default=default_of(PlanSettings, "layer_criterion"),
        choices=layer_criteria,
        help="layer and sublayer importance that orders layers (width and depth modes)",
    )
    plan.add_argument("--out", required=True, type=Path, help="output plan .json")
    plan.add_argument("--plot", type=Path, default=None, help="also draw the plan as PNG")
    plan.set_defaults(run=cmd_plan)

    _learn_masks_parser(commands, device_options)

    prune = commands.add_parser("prune", help="apply a plan: physically smaller HF checkpoint")
    prune.add_argument(
        "--model", required=True, type=Path, help="model folder the plan was built for (or learn-masks' OUT/model)"
    )
    prune.add_argument("--plan", required=True, type=Path, help="plan .json (from plan)")
    prune.add_argument("--out", required=True, type=Path, help="output folder: the pruned checkpoint")
    prune.add_argument(
        "--calib", type=Path, default=None,
        help="calibration blocks (from `calib`): refit the kept columns of o_proj/down_proj by least squares (expert "
        "plans: o_proj, the shared MLP's output and each expert's down_proj, where the plan cut their inputs)",
    )  # fmt: skip
    prune.add_argument("--no-reconstruct", action="store_true", help="slice only, even with --calib")
    prune.add_argument(
        "--ridge",
        type=float,
        default=default_of(ReconstructionSettings, "ridge"),
        help="refit ridge, relative to each input's Gram diagonal",
    )
    prune.add_argument(
        "--reconstruct-target", default=default_of(ReconstructionSettings, "target"), choices=RECONSTRUCTION_TARGETS,
        help="own: each layer matches the dense layer on the pruned inputs; dense: the dense model's outputs",
    )  # fmt: skip
    prune.add_argument(
        "--select", default=default_of(ReconstructionSettings, "select"), choices=RECONSTRUCTION_SELECTIONS,
        help="obs: the refit re-chooses which units of each layer go (greedy structured OBS; the plan's counts "
        "stay, learned masks keep theirs); plan: keep the plan's units",
    )  # fmt: skip
    prune.add_argument(
        "--batch-size", type=_positive_int, default=default_of(ReconstructionSettings, "batch_size"),
        help="calibration blocks per refit batch",
    )  # fmt: skip
    prune.add_argument(
        "--refit-inputs", action="store_true", default=default_of(ReconstructionSettings, "inputs"),
        help="also refit q/k/v and gate/up (which read the shifted residual stream) towards the dense model's "
        "outputs: the full sequential refit",
    )  # fmt: skip
    device_options(prune)
    prune.set_defaults(run=cmd_prune)

    ppl = commands.add_parser("ppl", help="WikiText-2 perplexity over non-overlapping windows")
    ppl.add_argument("--model", required=True, type=Path, help="model folder, or a .gguf from export-gguf (llama.cpp)")
    ppl.add_argument(
        "--data-dir", type=Path, default=None, help="offline data laid out like ../shared/data (default: hub)"
    )
    ppl.add_argument(
        "--window", type=_positive_int, default=None, help="tokens per window (default: min(2048, model max))"
    )
    ppl.add_argument("--max-tokens", type=_positive_int, default=None, help="score only the first N tokens (CPU)")
    ppl.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    ppl.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    device_options(ppl)
    ppl.set_defaults(run=cmd_ppl)

    recover = commands.add_parser("recover", help="LoRA recovery of a pruned model (lm or kd loss), merged")
    recover.add_argument("--model", required=True, type=Path, help="pruned checkpoint (from `prune`)")
    recover.add_argument("--train-blocks", required=True, type=Path, help="training blocks (from `calib`)")
    recover.add_argument(
        "--loss",
        default=default_of(RecoverySettings, "loss"),
        choices=LOSSES,
        help="lm: next-token CE; kd: KL to the teacher",
    )
    recover.add_argument("--teacher", type=Path, default=None, help="dense model folder (kd)")
    for flag, kind, field, text in (
        ("--rank", _positive_int, "rank", "LoRA rank"),
        ("--alpha", float, "alpha", "LoRA alpha"),
        ("--dropout", float, "dropout", "LoRA dropout (0 on mixtures of experts)"),
        ("--lr", float, "lr", "peak learning rate (warm-up, then cosine decay)"),
        ("--steps", _positive_int, "steps", "optimizer steps"),
        ("--batch-size", _positive_int, "batch_size", "training blocks per step"),
        ("--warmup-steps", int, "warmup_steps", "linear warm-up steps"),
        ("--temperature", float, "temperature", "kd softmax temperature"),
        ("--seed", int, "seed", "seed of the LoRA init and the batch order"),
    ):
        recover.add_argument(flag, type=kind, default=default_of(RecoverySettings, field), help=text)
    recover.add_argument(
        "--router",
        default=default_of(RecoverySettings, "router"),
        choices=ROUTER_MODES,
        help="mixture of experts: routers frozen (default) or trained in full; LoRA adapts every expert either way",
    )
    recover.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for memory (8B models on one GPU)"
    )
    recover.add_argument(
        "--out", required=True, type=Path, help="output folder: the recovered checkpoint, adapters merged"
    )
    device_options(recover)
    recover.set_defaults(run=cmd_recover)

    quantize = commands.add_parser("quantize", help="INT4/INT8 GPTQ or round-to-nearest through GPTQModel")
    quantize.add_argument("--model", required=True, type=Path, help="model folder (dense, pruned or recovered)")
    quantize.add_argument(
        "--method",
        default="gptq",
        choices=("gptq", "rtn"),
        help="gptq (calibrated, needs --calib) or rtn (round-to-nearest, no calibration)",
    )
    quantize.add_argument("--bits", type=int, default=4, help="bits per weight (4 or 8)")
    quantize.add_argument("--group-size", type=int, default=64, help="must divide every in_features for torch_aten")
    quantize.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    quantize.add_argument("--asym", action="store_true", help="asymmetric (default symmetric)")
    quantize.add_argument(
        "--kernel",
        default="auto",
        help="CPU kernel: auto (torch_aten for 4 bits, torch_int8 for 8, torch on a mixture of experts), torch_aten, "
        "torch_int8, torch",
    )
    quantize.add_argument("--calib", type=Path, default=None, help="calibration blocks (gptq)")
    quantize.add_argument("--n-samples", type=_positive_int, default=128, help="calibration blocks used (gptq)")
    quantize.add_argument("--batch-size", type=_positive_int, default=1, help="calibration blocks per GPTQ forward")
    quantize.add_argument("--out", required=True, type=Path, help="output folder: a GPTQ-format checkpoint")
    quantize.set_defaults(run=cmd_quantize)

    aggregate = commands.add_parser("aggregate", help="tradeoff table, Pareto fronts and plots from a manifest")
    aggregate.add_argument(
        "--manifest", required=True, help="JSON file, or inline JSON, naming each variant's artefacts"
    )
    aggregate.add_argument("--csv", required=True, type=Path, help="the table; .md, .html and plots are written beside")
    aggregate.set_defaults(run=cmd_aggregate)

    profile = commands.add_parser("profile", help="Snakemake profiles")
    profile_commands = profile.add_subparsers(dest="profile_command", required=True, parser_class=_OneLineParser)
    install = profile_commands.add_parser("install", help="write the Slurm profile to ~/.config/snakemake/slurm/")
    install.add_argument("--partition", required=True, help="Slurm partition of every job")
    install.add_argument("--account", required=True, help="Slurm account charged")
    install.add_argument("--gpu-model", default=None, help="e.g. a100 (GPU rules then ask for --gpus=MODEL:1)")
    install.add_argument(
        "--dest",
        type=Path,
        default=Path("~/.config/snakemake/slurm"),
        help="profile folder (snakemake --profile slurm reads ~/.config/snakemake/slurm)",
    )
    install.add_argument("--force", action="store_true", help="replace an existing profile")
    install.set_defaults(run=cmd_profile_install)

    evaluate = commands.add_parser("evaluate", help="lm-eval tasks (offline copies with --data-dir)")
    evaluate.add_argument("--model", required=True, type=Path, help="model folder")
    evaluate.add_argument(
        "--tasks", required=True, type=parse_task_limits,
        help="comma-separated task[=limit]: arc_easy, arc_challenge, hellaswag, piqa, winogrande, wikitext",
    )  # fmt: skip
    evaluate.add_argument("--data-dir", type=Path, default=None, help="offline data laid out like ../shared/data")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, help="requests per forward pass")
    evaluate.add_argument("--max-length", type=_positive_int, default=None, help="default: min(2048, model max)")
    evaluate.add_argument("--out", required=True, type=Path, help="JSON: summary + lm-eval's full results")
    device_options(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    efficiency = commands.add_parser("efficiency", help="size, KV cache, peak memory, prefill latency, decode speed")
    efficiency.add_argument(
        "--model", required=True, type=Path, help="model folder, or a .gguf from export-gguf (llama.cpp figures)"
    )
    efficiency.add_argument(
        "--prompt-tokens", type=_positive_int, default=None, help="default: 256 (folders), 512 (GGUF, as llama-bench)"
    )
    efficiency.add_argument(
        "--decode-tokens", type=_positive_int, default=None, help="default: 32 (folders), 128 (GGUF, as llama-bench)"
    )
    efficiency.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed repetitions (the median is reported)"
    )
    efficiency.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions")
    efficiency.add_argument("--out", required=True, type=Path, help="output .json")
    device_options(efficiency)
    efficiency.set_defaults(run=cmd_efficiency)

    export = commands.add_parser("export-gguf", help="write a model folder as one GGUF file that llama.cpp runs")
    export.add_argument("--model", required=True, type=Path, help="model folder (stage, prune, recover, ...)")
    export.add_argument("--out", required=True, type=Path, help="output .gguf file")
    export.add_argument(
        "--type", default="f16", choices=GGUF_TYPES,
        help="f32/f16/bf16 written directly; q8_0 and K-quants by llama.cpp's quantizer (default: %(default)s)",
    )  # fmt: skip
    export.set_defaults(run=cmd_export_gguf)

    plot = commands.add_parser("plot", help="draw a plan: kept groups/channels against layer importance (PNG)")
    plot.add_argument("--plan", required=True, type=Path, help="plan .json (from plan)")
    plot.add_argument("--out", required=True, type=Path, help="output .png")
    plot.set_defaults(run=cmd_plot)
    return parser


# sub-command -> its output options: (option, is a folder, the sub-command named in the output's marker)
OUTPUTS = {
    "stage": (("out", True, "stage"),),
    "calib": (("out", False, "calib"),),
    "importance": (("out", True, "importance"),),
    "plan": (("out", False, "plan"), ("plot", False, "plot")),
    "learn-masks": (("out", True, "learn-masks"),),
    "prune": (("out", True, "prune"),),
    "ppl": (("out", False, "ppl"),),
    "recover": (("out", True, "recover"),),
    "quantize": (("out", True, "quantize"),),
    "evaluate": (("out", False, "evaluate"),),
    "efficiency": (("out", False, "efficiency"),),
    "export-gguf": (("out", False, "export-gguf"),),
    "aggregate": (("csv", False, "aggregate"),),
    "plot": (("out", False, "plot"),),
}


def _names_a_path(text: str) -> bool:
    try:
        return bool(text) and not text.lstrip().startswith("{") and Path(text).exists()
    except (OSError, ValueError):
        return False


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: each output replaces only an earlier output of the same sub-command, and is no input."""
    from .atomic import check_not_input, check_output

    outputs = [(getattr(args, option), is_dir, kind) for option, is_dir, kind in OUTPUTS.get(args.command, ())]
    outputs = [(path, is_dir, kind) for path, is_dir, kind in outputs if path is not None]
    names = {option for option, _, _ in OUTPUTS.get(args.command, ())}
    inputs = {  # path options, and text options that name an existing path (--source, --manifest)
        f"--{name.replace('_', '-')}": Path(value)
        for name, value in vars(args).items()
        if name not in names and (isinstance(value, Path) or (isinstance(value, str) and _names_a_path(value)))
    }
    for path, is_dir, kind in outputs:
        check_not_input(path, inputs)
        check_output(path, is_dir, kind)


def _terminate(signum, frame) -> None:
    """SIGTERM (a scheduler's kill, Snakemake's cancel) unwinds like Ctrl-C, so temporaries are removed."""
    raise SystemExit(128 + signum)


def _end_progress_line() -> None:
    """An interrupted progress bar leaves its line open (one interrupted while being made cannot even be
    closed): with tqdm loaded, start a new line, so that the closing message is a line of its own."""
    if "tqdm" in sys.modules:
        print(file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from .remote_code import allow_remote_code

    try:
        allow_remote_code(args.trust_remote_code)
        check_outputs(args)
        args.run(args)
    except GqaPruneError as error:
        print(f"gqa-prune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: temporaries are gone (atomic), nothing half-written is left
        _end_progress_line()
        print(f"gqa-prune {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        allow_remote_code(False)  # per call: main() may run again in the same process (tests, notebooks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
