"""Single levers of the one-shot recipe, changed one at a time on SmolLM2-135M: the hybrid Taylor plan at one
ratio from bench/quality.py's cached scores (8 x 2048 C4 tokens), then the refit, then WikiText-2 perplexity
(windows of 2048, first 16,384 tokens). Appends one JSON line per setting to --out, skips settings already there.

    python bench/levers.py [--ratio 0.2] [--settings "recon=0;alpha=0,channel_multiple=32,blocks=32;ridge=0.3"]

A setting is ';'-joined key=value pairs: plan settings (``alpha``, ``strategy``, ``channel_multiple``,
``max_rate``, ``min_rate``, ``layer_criterion``),
reconstruction settings (``ridge``, ``target``, ``select``; ``recon=0`` slices only) and ``blocks`` (how many
C4 blocks of 2048 tokens, seed 0, the refit sees; 8 by default, the first 8 are the scores' blocks). The refit
keeps the plan's units (``select=plan``) unless the setting says ``select=obs`` (the CLI default), at ridge 1.0
(the default when this table was measured; 0.3 since) unless it says ``ridge``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import DATA_DIR, REPO, load_bench, markdown

from gqa_prune import scores as stored
from gqa_prune.data import calibration_blocks, read_documents
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct
from gqa_prune.surgery import apply_plan

PLAN_KEYS = {
    "alpha": float,
    "strategy": str,
    "channel_multiple": int,
    "max_rate": float,
    "min_rate": float,
    "layer_criterion": str,
}
REFIT_KEYS = {"ridge": float, "target": str, "select": str}
DEFAULT_SETTINGS = ",".join(
    ["recon=0", "recon=0;alpha=0", "recon=0;alpha=2", "recon=0;channel_multiple=32", "channel_multiple=32"]
    + ["target=dense", "blocks=32", "blocks=32;ridge=0.3"]
)


def parse(setting: str) -> tuple[dict, dict, int, bool]:
    """'alpha=0;ridge=0.3' -> plan options, refit options, calibration blocks, whether to refit."""
    pairs = dict(part.split("=", 1) for part in setting.split(";") if part)
    refit = pairs.pop("recon", "1") != "0"
    blocks = int(pairs.pop("blocks", 8))
    plan = {key: PLAN_KEYS[key](pairs.pop(key)) for key in list(pairs) if key in PLAN_KEYS}
    chosen = {key: REFIT_KEYS[key](pairs.pop(key)) for key in list(pairs) if key in REFIT_KEYS}
    options = {"select": "plan", "ridge": 1.0, **chosen}
    if pairs:
        raise SystemExit(
            f"unknown lever {next(iter(pairs))!r}: use {', '.join([*PLAN_KEYS, *REFIT_KEYS])}, blocks, recon"
        )
    return plan, options, blocks, refit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated settings (see above)")
    parser.add_argument("--scores", type=Path, default=REPO / "results" / "bench" / "quality-taylor-8x2048")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "levers.jsonl")
    args = parser.parse_args()
    bench = load_bench()
    scores = stored.load(args.scores)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    for setting in args.settings.split(","):
        key = ["taylor", setting] if args.ratio == 0.2 else ["taylor", setting, args.ratio]
        if any(entry["key"] == key for entry in done):
            continue
        plan_options, refit_options, n_blocks, refit = parse(setting)
        plan = build_plan(scores, PlanSettings(ratio=args.ratio, mode="hybrid", **plan_options))
        model = copy.deepcopy(bench.model)
        start = time.perf_counter()
        if refit:
            blocks = bench.blocks
            if n_blocks != len(bench.blocks):
                documents = read_documents(str(DATA_DIR / "c4" / "sample_c4-rp1.jsonl"))
                blocks = calibration_blocks(bench.tokenizer, documents, n_blocks, bench.blocks.shape[1], seed=0)
            plan, _ = reconstruct(model, plan, blocks, ReconstructionSettings(**refit_options))
        apply_plan(model, plan)
        removed = [1536 - len(layer.kept.get("mlp_channel", ())) for layer in plan.layers]
        done.append({"key": key, "ppl": bench.ppl(model).perplexity, "params": plan.params_after,
                     "removed": removed, "s": time.perf_counter() - start})  # fmt: skip
        with args.out.open("a") as handle:
            handle.write(json.dumps(done[-1]) + "\n")
    rows = [{"setting": entry["key"][1], "ratio": entry["key"][2] if len(entry["key"]) > 2 else 0.2,
             "PPL": f"{entry['ppl']:.2f}", "seconds": f"{entry['s']:.0f}"} for entry in done]  # fmt: skip
    print(markdown(rows, ["setting", "ratio", "PPL", "seconds"]))
    print(bench.describe())


if __name__ == "__main__":
    main()
