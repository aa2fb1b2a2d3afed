"""One-shot quality side by side on SmolLM2-135M: the same model, calibration blocks and evaluation for every
method, at several fractions of attention+MLP parameters removed. No recovery fine-tuning anywhere.

Rows: dense; ShortGPT-style depth (gqa-prune's depth mode, which tests/test_smollm2.py checks against an
independent ShortGPT); Torch-Pruning (the PyPI package, its LLM example's GQA settings, Taylor importance;
see bench/peers.py); gqa-prune width with Taylor scores and the attention/MLP split equal (the previous
default) without and with reconstruction; hybrid with Taylor scores without reconstruction, with Fisher and
OBS scores with it, and with Taylor scores and reconstruction of the plan's own units (``select="plan"``); and
the defaults (`gqa-prune importance` -> `plan --ratio R` -> `prune --calib C`, read from the code): hybrid
Taylor plans whose reconstruction re-chooses the units of each layer by greedy structured OBS. Every
"+ reconstruction" row uses the defaults' reconstruction settings. Columns: parameters, WikiText-2
perplexity, mean accuracy over the offline lm-eval tasks, the scoring pass's wall time (shared by the rows
using those scores) and the wall time of plan + prune + refit. Every method gets the same calibration blocks
(``--blocks`` x 2048 tokens of C4, seed 0, 32 by default as `gqa-prune calib` gives): scores and refits use
all of them, the loss curves the first 8,192 tokens (the CLI's default).

    python bench/quality.py [--ratios 0.1,0.2,0.3] [--task-limit 50] [--blocks 32] [--json rows.json]
        [--scores-dir results/bench] [--curve-blocks N] [--rows defaults,ShortGPT] [--recover-steps 50]
        [--slicegpt /work/peers/TransformerCompression --slicegpt-python /work/peers/slicegpt-venv/bin/python]
        [--flap /work/peers/FLAP]

More rows of the defaults: ``--refit-inputs`` (the full sequential refit), iterative pruning in 2 and 3
rounds (``gqa_prune.iterative``: each round re-scores the model pruned so far; the first round reuses the
stored scores, the later rounds' scoring is timed in "plan + prune + refit"), and both levers combined (2 rounds,
each refit with ``--refit-inputs``).

With ``--slicegpt CHECKOUT --slicegpt-python PYTHON`` a SliceGPT row follows Torch-Pruning at every ratio,
run in its own environment (``bench/slicegpt_peer.py`` says how to set it up and what is adapted): same model,
calibration blocks and WikiText-2 windows; its width ``d'`` keeps the same share of attention+MLP parameters
(shortcut matrices counted); lm-eval is not run in that environment ("mean acc: not run").

With ``--flap CHECKOUT`` a FLAP row follows (WIFV, AL-AM, bias compensation, from the CASIA-IVA-Lab/FLAP
checkout's own statistics, metric and compression; ``bench/flap_peer.py`` says what is adapted for GQA), in this
process and with the same evaluation as the other rows.

With ``--recover-steps N`` every pruned row is followed by the same model after LoRA recovery with
`gqa-prune recover`'s defaults for N steps (next-token loss, rank 8, 2 blocks per step) on a C4 sample of
its own (seed 1, 256-token blocks, each block seen once): the row "<method> + LoRA (N steps)".

With ``--json`` the rows are written after each one, and a second run with the same file skips the rows it
already holds (an interrupted run goes on where it stopped). A row whose plan has the same per-layer counts as
an earlier row's, refit the same way with the OBS choice of units, is the same model: it is not refit again
but shows that row's figures and names it ("same model as").
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import flap_peer
import slicegpt_peer
import torch
from common import DATA_DIR, MODEL_DIR, REPO, load_bench, markdown

from gqa_prune import api, importance
from gqa_prune import scores as stored
from gqa_prune.choices import DEFAULT_UNIT_CRITERION
from gqa_prune.cli import build_parser
from gqa_prune.data import calibration_blocks, read_documents
from gqa_prune.evaluation import CHANCE, run_lm_eval, summarize
from gqa_prune.iterative import prune_iteratively
from gqa_prune.planning import PlanSettings, PruningPlan, build_plan
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct
from gqa_prune.settings import RecoverySettings
from gqa_prune.surgery import apply_plan

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")


def default_recipe() -> tuple[str, PlanSettings, ReconstructionSettings]:
    """The unit criterion, plan and reconstruction settings a user gets with no flags (read from the CLI)."""
    parser = build_parser()
    actions = {action.dest: action for action in parser._subparsers._group_actions[0].choices["importance"]._actions}
    plan_actions = {action.dest: action for action in parser._subparsers._group_actions[0].choices["plan"]._actions}
    prune_actions = {action.dest: action for action in parser._subparsers._group_actions[0].choices["prune"]._actions}
    settings = PlanSettings(ratio=0.0, mode=plan_actions["mode"].default, strategy=plan_actions["strategy"].default)
    refit = ReconstructionSettings(
        ridge=prune_actions["ridge"].default,
        target=prune_actions["reconstruct_target"].default,
        select=prune_actions["select"].default,
    )
    return actions["criterion"].default or DEFAULT_UNIT_CRITERION, settings, refit


def recovery_blocks(bench, settings: RecoverySettings, block_len: int = 256) -> torch.Tensor:
    """C4 training blocks for LoRA, apart from the calibration blocks (seed 1): one per step and batch row."""
    documents = read_documents(str(DATA_DIR / "c4" / "sample_c4-rp1.jsonl"))
    return calibration_blocks(bench.tokenizer, documents, settings.steps * settings.batch_size, block_len, seed=1)


def model_key(plan: PruningPlan, refit: ReconstructionSettings | None, calibration: str) -> str | None:
    """What fixes the pruned model's weights when the refit re-chooses every layer's units by OBS: the removed
    layers and sublayers, how many units of each kind every layer keeps, the refit settings and the
    calibration. Two plans with the same key give the same model (tests/test_reconstruct.py checks this); None
    where the plan's own units count too."""
    if refit is None or refit.select != "obs" or plan.settings.mode == "learned":
        return None
    layers = [
        [layer.removed, {kind: len(units) for kind, units in sorted(layer.kept.items())}] for layer in plan.layers
    ]
    settings = {key: value for key, value in asdict(refit).items() if not (key == "inputs" and value is False)}
    text = json.dumps([layers, settings, calibration], sort_keys=True)  # keys of rows before `inputs` existed hold
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--task-limit", type=int, default=50, help="items per lm-eval task")
    parser.add_argument(
        "--scores-dir", type=Path, default=REPO / "results" / "bench", help="importance folders (reused)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here after each one")
    parser.add_argument("--rows", default=None, help="only rows whose name contains one of these (comma-separated)")
    parser.add_argument(
        "--curve-blocks", type=int, default=None, help="blocks the loss curves use (default: the CLI's)"
    )
    parser.add_argument("--blocks", type=int, default=32, help="C4 calibration blocks of 2048 tokens (seed 0)")
    parser.add_argument("--recover-steps", type=int, default=0, help="also each pruned model after N LoRA steps")
    parser.add_argument(
        "--slicegpt", type=Path, default=None, help="a microsoft/TransformerCompression checkout: SliceGPT rows"
    )
    parser.add_argument("--slicegpt-python", type=Path, default=None, help="the Python of SliceGPT's own environment")
    parser.add_argument("--flap", type=Path, default=None, help="a CASIA-IVA-Lab/FLAP checkout: FLAP rows")
    args = parser.parse_args()
    bench = load_bench(n_blocks=args.blocks)
    train_blocks = recovery_blocks(bench, RecoverySettings(steps=args.recover_steps)) if args.recover_steps else None
    tasks = dict.fromkeys(TASKS, args.task_limit)

    def evaluate(model) -> dict:
        ppl = bench.ppl(model)
        summary = summarize(
            run_lm_eval(model, bench.tokenizer, tasks, DATA_DIR, batch_size=8, max_length=2048), DATA_DIR
        )
        accuracies = [entry.get("acc_norm", entry["acc"]) for entry in summary.values()]
        return {"PPL": f"{ppl.perplexity:.2f}", "mean acc": f"{sum(accuracies) / len(accuracies):.3f}"}

    score_seconds: dict[str, float] = {}

    def scores(criterion: str):
        curves = "" if args.curve_blocks is None else f"-curves{args.curve_blocks}"
        folder = args.scores_dir / f"quality-{criterion}-{args.blocks}x2048{curves}"
        if folder.is_dir():
            loaded = stored.load(folder)
            score_seconds[criterion] = loaded.info.get("seconds", float("nan"))
            return loaded
        start = time.perf_counter()
        result = importance.score(bench.model, bench.blocks, criterion, curve_blocks=args.curve_blocks)
        result.info["seconds"] = score_seconds[criterion] = time.perf_counter() - start
        stored.save(result, folder)
        return result

    criterion, default_settings, default_refit = default_recipe()
    # rows already in --json are kept and not run again: an interrupted run goes on where it stopped
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {(row["method"], row["ratio"]) for row in rows if not row["PPL"].startswith("failed")}
    if ("dense", "–") not in done:
        parameters = sum(p.numel() for p in bench.model.parameters())
        rows.insert(0, {"method": "dense", "ratio": "–", "parameters": f"{parameters:,}", **evaluate(bench.model)})
    units = replace(default_refit, select="plan")  # the refit keeps the plan's units (select obs re-chooses them)
    recipes = [  # the defaults first: the row every other one is measured against
        ("**gqa-prune defaults** (no flags)", criterion, dict(mode=default_settings.mode), default_refit),
        ("ShortGPT (depth, block influence)", "taylor", dict(mode="depth"), None),
        ("gqa-prune width, Taylor, attention = MLP ratio (previous default)", "taylor", dict(mode="width"), None),
        ("… + reconstruction", "taylor", dict(mode="width"), default_refit),
        ("gqa-prune hybrid, Taylor", "taylor", dict(mode="hybrid"), None),
        ("gqa-prune hybrid, Fisher + reconstruction", "fisher", dict(mode="hybrid"), default_refit),
        ("gqa-prune hybrid, OBS + reconstruction", "obs", dict(mode="hybrid"), default_refit),
        ("gqa-prune hybrid, Taylor + reconstruction of the plan's units", "taylor", dict(mode="hybrid"), units),
        (
            "gqa-prune defaults + full sequential refit (--refit-inputs)",
            criterion,
            dict(mode=default_settings.mode),
            replace(default_refit, inputs=True),
        ),
        *(
            (
                f"gqa-prune defaults, iterative ({k} rounds)",
                criterion,
                dict(mode=default_settings.mode, steps=k),
                default_refit,
            )
            for k in (2, 3)
        ),
        (
            "gqa-prune defaults, iterative (2 rounds) + full sequential refit (--refit-inputs)",
            criterion,
            dict(mode=default_settings.mode, steps=2),
            replace(default_refit, inputs=True),
        ),
    ]
    columns = ["method", "ratio", "parameters", "PPL", "mean acc", "scoring", "plan + prune + refit", "recovery",
               "same model as"]  # fmt: skip

    def add_row(name: str, ratio: float, build) -> None:
        """Run one method: ``build`` returns the pruned model, its parameter count, scoring and model key, or the
        earlier row that is the same model."""
        recovered_name = f"{name} + LoRA ({args.recover_steps} steps)"
        if (name, f"{ratio:.2f}") in done and (not args.recover_steps or (recovered_name, f"{ratio:.2f}") in done):
            return
        start = time.perf_counter()
        try:  # recovery needs the model itself, so an earlier row of the same model is reused only without it
            built = build(reuse=not args.recover_steps)
        except Exception as error:  # a failing method is a row that says so, not hours of work lost
            rows.append({"method": name, "ratio": f"{ratio:.2f}", "PPL": f"failed: {error}"})
            print(rows[-1], flush=True)
            return
        if isinstance(built, dict):  # figures measured elsewhere: an earlier row of the same model, or a peer's process
            figures = {key: value for key, value in built.items() if key not in ("method", "ratio", "recovery")}
            rows.append({"method": name, "ratio": f"{ratio:.2f}", **figures})
        else:
            model, parameters, scoring, key = built
            seconds = time.perf_counter() - start
            if (name, f"{ratio:.2f}") not in done:
                rows.append({"method": name, "ratio": f"{ratio:.2f}", "parameters": f"{parameters:,}",
                             **evaluate(model), "scoring": scoring, "plan + prune + refit": f"{seconds:.0f} s",
                             "model key": key})  # fmt: skip
                save(rows)
            if args.recover_steps:
                start = time.perf_counter()
                model = api.recover(model, train_blocks, steps=args.recover_steps)
                seconds = time.perf_counter() - start
                rows.append({"method": recovered_name, "ratio": f"{ratio:.2f}", "parameters": f"{parameters:,}",
                             **evaluate(model), "scoring": scoring, "recovery": f"{seconds:.0f} s"})  # fmt: skip
                save(rows)
            return
        save(rows)

    def save(rows: list[dict]) -> None:
        print(rows[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    def torch_pruning(ratio: float):
        from peers import torch_pruning_prune

        model = torch_pruning_prune(copy.deepcopy(bench.model), bench.blocks, ratio)
        return model, sum(p.numel() for p in model.parameters()), "in the pruner", None

    def slicegpt(ratio: float) -> dict:
        """SliceGPT's figures at the width that keeps ``1 - ratio`` of attention+MLP (its own process)."""
        dim = slicegpt_peer.dimension_for(bench.model.config, ratio)
        python = args.slicegpt_python or Path(sys.executable)
        (result,) = slicegpt_peer.slicegpt(
            python, args.slicegpt, MODEL_DIR, bench.blocks, bench.wikitext, [dim], bench.window, bench.max_tokens
        )
        return {
            "parameters": f"{result['parameters']:,} (d' = {dim})", "PPL": f"{result['perplexity']:.2f}",
            "mean acc": "not run", "scoring": "PCA (in the pruner)",
            "plan + prune + refit": f"{result['seconds']:.0f} s", "model key": None,
            "dense PPL in its environment": f"{result['dense_perplexity']:.2f}",
        }  # fmt: skip

    def flap(ratio: float):
        model, parameters = flap_peer.flap_prune(copy.deepcopy(bench.model), bench.blocks, ratio, args.flap)
        return model, parameters, "fluctuation (in the pruner)", None

    def ours(ratio: float, unit_criterion: str, plan_options: dict, refit):
        scores(unit_criterion)  # computed (and timed) once, before this method's own clock starts

        def build(reuse: bool):
            result = scores(unit_criterion)
            scoring = f"{unit_criterion} {score_seconds.get(unit_criterion, float('nan')):.0f} s"
            if "steps" in plan_options:  # later rounds score the pruned model: their time is in plan + prune + refit
                options = dict(plan_options)
                steps = options.pop("steps")
                model = copy.deepcopy(bench.model)
                prune_iteratively(
                    model, bench.blocks, ratio, steps, unit_criterion, PlanSettings(**options), refit,
                    first_scores=result, curve_blocks=args.curve_blocks,
                )  # fmt: skip
                return model, sum(p.numel() for p in model.parameters()), scoring, None
            plan = build_plan(result, PlanSettings(ratio=ratio, **plan_options))
            key = model_key(plan, refit, f"C4 {args.blocks}x2048 seed 0")
            twin = next((row for row in rows if key and row.get("model key") == key), None)
            if reuse and twin is not None:  # the refit would give the very same weights: reuse that row's figures
                return {**twin, "scoring": scoring, "same model as": twin.get("same model as", twin["method"])}
            model = copy.deepcopy(bench.model)
            if refit is not None:
                plan, _ = reconstruct(model, plan, bench.blocks, refit)
            apply_plan(model, plan)
            return (
                model,
                plan.params_after,
                "block influence (one forward)" if plan_options["mode"] == "depth" else scoring,
                key,
            )

        return build

    for ratio in (float(r) for r in args.ratios.split(",")):
        for index, (name, unit_criterion, plan_options, refit) in enumerate(recipes):
            if index == 1 and (not args.rows or "Torch-Pruning" in args.rows):  # the strongest peer second
                from peers import describe_settings

                peer = f"Torch-Pruning ({describe_settings().split(',')[0]})"
                add_row(peer, ratio, lambda reuse: torch_pruning(ratio))
            if index == 1 and args.slicegpt and (not args.rows or "SliceGPT" in args.rows):
                add_row(f"SliceGPT ({slicegpt_peer.describe_settings(args.slicegpt)})", ratio,
                        lambda reuse: slicegpt(ratio))  # fmt: skip
            if index == 1 and args.flap and (not args.rows or "FLAP" in args.rows):
                add_row(f"FLAP ({flap_peer.describe_settings(args.flap)})", ratio, lambda reuse: flap(ratio))
            if args.rows and not any(part in name for part in args.rows.split(",")):
                continue
            add_row(name, ratio, ours(ratio, unit_criterion, plan_options, refit))
    print()
    print(markdown(rows, columns))
    print(
        f"\n{bench.describe()}; lm-eval {', '.join(TASKS)} (offline copies), first {args.task_limit} items each, "
        f"acc_norm (winogrande acc); chance {sum(CHANCE[t] for t in TASKS) / len(TASKS):.3f}"
    )
    print(f"default recipe: criterion {criterion}, mode {default_settings.mode}, reconstruction {default_refit}")


if __name__ == "__main__":
    main()
