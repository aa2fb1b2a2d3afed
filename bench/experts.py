"""Expert criteria side by side on the SmolLM2-MoE test bed (bench/moe_testbed.py): REAP, routing frequency,
gate sum, EAN and random, removing 25 %, 50 % and 75 % of the routed experts, one-shot (no recovery); the same
number from every layer (uniform, a stock checkpoint), and for ``--per-layer`` criteria ranked across layers.

Every row uses the same model, the same expert statistics (one `gqa-prune importance` pass over ``--blocks`` x
2048 tokens of C4, seed 0) and the same evaluation (WikiText-2 raw test, windows of 2048, the first
``--max-tokens`` tokens). The test bed is built from the first ``--testbed-blocks`` of those blocks and cached
in ``--cache`` (delete it to rebuild).

    python bench/experts.py [--ratios 0.25,0.5,0.75] [--per-layer reap,frequency] [--blocks 8]
        [--max-tokens 16384] [--json rows.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import REPO, load_bench, machine, markdown
from moe_testbed import TEMPERATURE, build_testbed
from transformers import Qwen2MoeForCausalLM

from gqa_prune.criteria.experts import EXPERT_CRITERIA
from gqa_prune.expert_importance import score_experts
from gqa_prune.expert_plan import build_expert_plan
from gqa_prune.expert_surgery import apply_expert_plan
from gqa_prune.settings import ExpertPlanSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--criteria", default=",".join(EXPERT_CRITERIA))
    parser.add_argument("--per-layer", default="reap,frequency", help="criteria also run with per-layer counts")
    parser.add_argument("--blocks", type=int, default=8, help="C4 calibration blocks of 2048 tokens")
    parser.add_argument("--testbed-blocks", type=int, default=4, help="of those, how many build the test bed")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared", type=int, default=1024, help="channels of each layer's shared expert")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "bench" / "smollm2-moe")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    bench = load_bench(n_blocks=args.blocks, max_tokens=args.max_tokens)
    cache = args.cache.with_name(f"{args.cache.name}-e{args.experts}-k{args.top_k}-s{args.shared}")
    if (cache / "config.json").is_file():
        testbed = Qwen2MoeForCausalLM.from_pretrained(cache).eval()
    else:
        started = time.perf_counter()
        testbed = build_testbed(bench.model, bench.blocks[: args.testbed_blocks], args.experts, args.top_k, args.shared)
        testbed.save_pretrained(cache)
        print(f"test bed built in {time.perf_counter() - started:.0f} s -> {cache}")
    rows = []

    def add(method: str, model, experts: str, seconds: float | None = None) -> None:
        result = bench.ppl(model)
        dense_ppl = rows[0]["ppl"] if rows else result.perplexity
        rows.append({
            "method": method, "experts per layer": experts,
            "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M",
            "ppl": round(result.perplexity, 2), "x dense": f"{result.perplexity / dense_ppl:.2f}",
            "plan s": "" if seconds is None else f"{seconds:.2f}",
        })  # fmt: skip
        print(rows[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    add("dense SmolLM2-135M", bench.model, "(dense MLP)")
    add(f"test bed: all experts (top-{args.top_k})", testbed, str(args.experts))
    started = time.perf_counter()
    statistics = score_experts(testbed, bench.blocks, batch_size=1)
    print(f"expert statistics: {time.perf_counter() - started:.0f} s over {args.blocks} x 2048 tokens")
    runs = [(criterion, "uniform") for criterion in args.criteria.split(",")]
    runs += [(criterion, "per-layer") for criterion in args.per_layer.split(",") if criterion]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for criterion, allocation in runs:
            started = time.perf_counter()
            plan = build_expert_plan(statistics, ExpertPlanSettings(ratio, criterion, allocation))
            seconds = time.perf_counter() - started
            pruned = apply_expert_plan(copy.deepcopy(testbed), plan)
            kept = [plan.pruned_geometry().experts[i] for i in plan.geometry.moe_layers]
            counts = str(kept[0]) if min(kept) == max(kept) else f"{min(kept)}-{max(kept)}"
            add(f"{criterion} ({allocation}), {ratio:.0%} of experts removed", pruned, counts, seconds)
            del pruned

    print()
    print(
        f"SmolLM2-MoE test bed (Qwen2-MoE: per layer a shared expert of {args.shared} channels and {args.experts} "
        f"routed experts of {testbed.config.moe_intermediate_size}, top-{args.top_k}, gates ~uniform by "
        f"construction: router temperature {TEMPERATURE}); {bench.describe()}"
    )
    print()
    print(markdown(rows, ["method", "experts per layer", "parameters", "ppl", "x dense", "plan s"]))
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
