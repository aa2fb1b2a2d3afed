"""The reconstruction's ridge and target, swept on SmolLM2-135M: hybrid plans at one ratio from bench/quality.py's
cached scores (8 x 2048 C4 tokens), refit on the same blocks, WikiText-2 perplexity (windows of 2048, first
16,384 tokens). Appends one JSON line per setting to --out and skips settings already there.

    python bench/ridge_sweep.py [--ratio 0.2] [--criteria taylor] [--settings 0.03:own,0.3:own,1:own,0.1:dense]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import REPO, load_bench, markdown

from gqa_prune import scores as stored
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct
from gqa_prune.surgery import apply_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criteria", default="taylor")
    parser.add_argument("--settings", default="0.03:own,0.1:own,0.3:own,1:own,3:own,0.1:dense", help="ridge:target")
    parser.add_argument(
        "--scores-dir", type=Path, default=REPO / "results" / "bench", help="quality-<criterion>-8x2048"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "ridge_sweep.jsonl")
    args = parser.parse_args()
    bench = load_bench()
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    for criterion in args.criteria.split(","):
        scores = stored.load(args.scores_dir / f"quality-{criterion}-8x2048")
        plan = build_plan(scores, PlanSettings(ratio=args.ratio, mode="hybrid"))
        for setting in args.settings.split(","):
            ridge, target = float(setting.split(":")[0]), setting.split(":")[1]
            key = [criterion, args.ratio, ridge, target]
            if any(entry["key"] == key for entry in done):
                continue
            model = copy.deepcopy(bench.model)
            start = time.perf_counter()
            refit = ReconstructionSettings(ridge=ridge, target=target, select="plan")  # the plan's units, as measured
            applied, _ = reconstruct(model, plan, bench.blocks, refit)
            apply_plan(model, applied)
            done.append({"key": key, "ppl": bench.ppl(model).perplexity, "seconds": time.perf_counter() - start})
            with args.out.open("a") as handle:
                handle.write(json.dumps(done[-1]) + "\n")
    rows = [
        {"criterion": c, "ratio": r, "ridge": ridge, "target": t, "PPL": f"{entry['ppl']:.2f}"}
        for entry in done
        for c, r, ridge, t in [entry["key"]]
    ]
    print(markdown(rows, ["criterion", "ratio", "ridge", "target", "PPL"]))
    print(bench.describe())


if __name__ == "__main__":
    main()
