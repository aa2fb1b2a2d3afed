"""Plan modes side by side on SmolLM2-135M: width (default split and hand splits), depth, hybrid.

One importance run (Taylor, block influence, loss curves), then for each ratio every plan is applied
physically (``apply_plan``) and scored on WikiText-2; no recovery, no reconstruction. Prints a Markdown
table (mode x ratio: parameters, achieved split, PPL) and the measured loss curves the hybrid plan used.

    python bench/modes.py [--ratios 0.1,0.2,0.3] [--blocks 8] [--block-len 2048] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from common import load_bench, markdown

from gqa_prune import importance
from gqa_prune import scores as stored
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.surgery import apply_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-len", type=int, default=2048)
    parser.add_argument("--curve-blocks", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--rows", default=None, help="only these rows (comma-separated names), e.g. hybrid,depth")
    parser.add_argument("--scores", type=Path, default=None, help="reuse (or write) the importance folder here")
    args = parser.parse_args()
    bench = load_bench(args.blocks, args.block_len, max_tokens=args.max_tokens)
    start = time.perf_counter()
    if args.scores is not None and args.scores.is_dir():
        scores = stored.load(args.scores)
    else:
        scores = importance.score(bench.model, bench.blocks, "taylor", batch_size=1, curve_blocks=args.curve_blocks)
        print(f"importance (taylor + loss curves): {time.perf_counter() - start:.0f} s")
        if args.scores is not None:
            stored.save(scores, args.scores)
    geometry = scores.geometry
    attention = sum(geometry.attention_params(i) for i in range(geometry.num_layers))
    mlp = sum(geometry.mlp_params(i) for i in range(geometry.num_layers))
    dense = bench.ppl(bench.model)
    rows = [
        {
            "mode": "dense",
            "ratio": "-",
            "parameters": f"{scores.info['parameters']:,}",
            "PPL": f"{dense.perplexity:.2f}",
        }
    ]
    for ratio in (float(r) for r in args.ratios.split(",")):
        candidates = {
            "width (attention = MLP ratio)": PlanSettings(ratio=ratio, mode="width"),
            "width, MLP only": PlanSettings(attn_ratio=0.0, mlp_ratio=ratio * (attention + mlp) / mlp),
            "width, 1/10 from attention": PlanSettings(
                attn_ratio=0.1 * ratio * (attention + mlp) / attention,
                mlp_ratio=0.9 * ratio * (attention + mlp) / mlp,
            ),
            "depth": PlanSettings(ratio=ratio, mode="depth"),
            "hybrid": PlanSettings(ratio=ratio, mode="hybrid"),
        }
        for name, settings in candidates.items():
            if args.rows and not any(part in name for part in args.rows.split(",")):
                continue
            plan = build_plan(scores, settings)
            summary = plan.param_summary()
            pruned = apply_plan(copy.deepcopy(bench.model), plan)
            result = bench.ppl(pruned)
            rows.append({
                "mode": name,
                "ratio": f"{ratio:.2f}",
                "parameters": f"{summary['params_after']:,}",
                "removed (attn / MLP)": f"{summary['achieved_ratio']:.3f} ({summary['achieved_attn_ratio']:.2f} / "
                f"{summary['achieved_mlp_ratio']:.2f})",
                "layers / attn / MLP sublayers removed": f"{summary['layers_removed']} / "
                f"{summary['attn_sublayers_removed']} / {summary['mlp_sublayers_removed']}",
                "PPL": f"{result.perplexity:.2f}",
            })  # fmt: skip
            print(rows[-1], flush=True)
    columns = ["mode", "ratio", "parameters", "removed (attn / MLP)", "layers / attn / MLP sublayers removed", "PPL"]
    print()
    print(markdown(rows, columns))
    print(f"\n{bench.describe()}; {dense.tokens_scored:,} tokens scored")
    print("\nloss curves (parameters removed -> calibration loss increase, nats):")
    for kind, curve in scores.curves.items():
        print(f"  {kind}: " + ", ".join(f"{params / 1e6:.1f}M -> {loss:+.3f}" for params, loss in curve.points))


if __name__ == "__main__":
    main()
