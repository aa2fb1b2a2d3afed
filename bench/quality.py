"""One-shot quality side by side on SmolLM2-135M: the same model, calibration blocks and evaluation for every
method, at several fractions of attention+MLP parameters removed. No recovery fine-tuning anywhere.

Rows: dense; ShortGPT-style depth (gqa-prune's depth mode, which tests/test_smollm2.py checks against an
independent ShortGPT); Torch-Pruning (the PyPI package, its LLM example's GQA settings, Taylor importance;
see bench/peers.py); gqa-prune width with Taylor scores and the attention/MLP split equal (the previous
default) without and with reconstruction; hybrid with Taylor, Fisher and OBS scores, without and with
reconstruction of the plan's units (``select="plan"``); and the defaults (`gqa-prune importance` ->
`plan --ratio R` -> `prune --calib C`, read from the code), whose reconstruction re-chooses the units of each
layer by greedy structured OBS. Columns: parameters, WikiText-2 perplexity, mean accuracy over the offline
lm-eval tasks, the scoring pass's wall time (shared by the rows using those scores) and the wall time of
plan + prune + refit.

    python bench/quality.py [--ratios 0.1,0.2,0.3] [--task-limit 50] [--scores-dir results/bench] [--curve-blocks 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import DATA_DIR, REPO, load_bench, markdown

from gqa_prune import importance
from gqa_prune import scores as stored
from gqa_prune.cli import build_parser
from gqa_prune.evaluate import CHANCE, run_lm_eval, summarize
from gqa_prune.plan import PlanSettings, build_plan
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct
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
    return actions["criterion"].default, settings, refit


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
        "--curve-blocks", type=int, default=4, help="blocks the hybrid plans' loss curves are measured on"
    )
    args = parser.parse_args()
    bench = load_bench()
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
        folder = (
            args.scores_dir
            / f"quality-{criterion}-8x2048{'' if args.curve_blocks == 4 else f'-curves{args.curve_blocks}'}"
        )
        if folder.is_dir():
            loaded = stored.load(folder)
            score_seconds[criterion] = loaded.info.get("seconds", float("nan"))
            return loaded
        start = time.perf_counter()
        result = importance.score(bench.model, bench.blocks, criterion, batch_size=1, curve_blocks=args.curve_blocks)
        result.info["seconds"] = score_seconds[criterion] = time.perf_counter() - start
        stored.save(result, folder)
        return result

    criterion, default_settings, default_refit = default_recipe()
    rows = [{"method": "dense", "ratio": "–", "parameters": f"{sum(p.numel() for p in bench.model.parameters()):,}",
             **evaluate(bench.model)}]  # fmt: skip
    units = ReconstructionSettings(select="plan")  # the refit keeps the plan's units (select obs re-chooses them)
    recipes = [
        ("ShortGPT (depth, block influence)", "taylor", dict(mode="depth"), None),
        ("gqa-prune width, Taylor, attention = MLP ratio (previous default)", "taylor", dict(mode="width"), None),
        ("… + reconstruction", "taylor", dict(mode="width"), units),
        ("gqa-prune hybrid, Taylor", "taylor", dict(mode="hybrid"), None),
        ("gqa-prune hybrid, Taylor + reconstruction of the plan's units", "taylor", dict(mode="hybrid"), units),
        ("gqa-prune hybrid, Fisher + reconstruction of the plan's units", "fisher", dict(mode="hybrid"), units),
        ("gqa-prune hybrid, OBS + reconstruction of the plan's units", "obs", dict(mode="hybrid"), units),
    ]
    default = (criterion, dict(mode=default_settings.mode), default_refit)
    for index, (name, *recipe) in enumerate(recipes):
        if tuple(recipe) == default:  # the defaults are one of the rows above: mark it, do not run it twice
            recipes[index] = (f"**{name} = the defaults** (no flags)", *recipe)
            break
    else:
        recipes.append(("**gqa-prune defaults** (no flags)", *default))
    columns = ["method", "ratio", "parameters", "PPL", "mean acc", "scoring", "plan + prune + refit"]

    def add_row(name: str, ratio: float, build) -> None:
        """Run one method (``build`` returns the pruned model, its parameter count and scoring seconds)."""
        start = time.perf_counter()
        try:
            model, parameters, scoring = build()
        except Exception as error:  # a failing method is a row that says so, not hours of work lost
            rows.append({"method": name, "ratio": f"{ratio:.2f}", "PPL": f"failed: {error}"})
            print(rows[-1], flush=True)
            return
        seconds = time.perf_counter() - start
        rows.append({"method": name, "ratio": f"{ratio:.2f}", "parameters": f"{parameters:,}", **evaluate(model),
                     "scoring": scoring, "plan + prune + refit": f"{seconds:.0f} s"})  # fmt: skip
        print(rows[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    def torch_pruning(ratio: float):
        from peers import torch_pruning_prune

        model = torch_pruning_prune(copy.deepcopy(bench.model), bench.blocks, ratio)
        return model, sum(p.numel() for p in model.parameters()), "in the pruner"

    def ours(ratio: float, unit_criterion: str, plan_options: dict, refit):
        scores(unit_criterion)  # computed (and timed) once, before this method's own clock starts

        def build():
            result = scores(unit_criterion)
            plan = build_plan(result, PlanSettings(ratio=ratio, **plan_options))
            model = copy.deepcopy(bench.model)
            if refit is not None:
                plan, _ = reconstruct(model, plan, bench.blocks, refit)
            apply_plan(model, plan)
            scoring = f"{unit_criterion} {score_seconds.get(unit_criterion, float('nan')):.0f} s"
            return (
                model,
                plan.params_after,
                "block influence (one forward)" if plan_options["mode"] == "depth" else scoring,
            )

        return build

    for ratio in (float(r) for r in args.ratios.split(",")):
        if not args.rows or "Torch-Pruning" in args.rows:
            from peers import describe_settings

            add_row(f"Torch-Pruning ({describe_settings().split(',')[0]})", ratio, lambda: torch_pruning(ratio))
        for name, unit_criterion, plan_options, refit in recipes:
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
