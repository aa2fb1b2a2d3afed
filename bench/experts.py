"""Expert criteria side by side on the SmolLM2-MoE test bed (bench/moe_testbed.py): REAP, routing frequency,
gate sum, EAN, random, and the gradient criteria Taylor and Fisher, removing 25 %, 50 % and 75 % of the routed
experts, one-shot (no recovery); the same
number from every layer (uniform, a stock checkpoint); for ``--per-layer`` criteria counts per layer priced by
each layer's measured loss curve, for ``--ranked`` criteria ranked across layers by the criterion's value.

Every row uses the same model, the same expert statistics (one `gqa-prune importance` pass over ``--blocks`` x
2048 tokens of C4, seed 0) and the same evaluation (WikiText-2 raw test, windows of 2048, the first
``--max-tokens`` tokens). The test bed is built from the first ``--testbed-blocks`` of those blocks and cached
in ``--cache`` (delete it to rebuild).

    python bench/experts.py [--ratios 0.25,0.5,0.75] [--per-layer reap,frequency] [--ranked reap,frequency]
        [--width-ratios 0.25] [--width-per-layer] [--expert-channel-ratio 0.25 --channel-multiple 16]
        [--blocks 8] [--curve-blocks 2] [--max-tokens 16384]
        [--json rows.json]
        [--peer-dirs DIR ...]

The expert statistics and loss curves are cached beside the test bed (``importance-<blocks>x2048-c<curve
blocks>``); delete that folder to measure them again. Asking for ``taylor`` or ``fisher`` records the statistics
with a backward per batch (``importance --criterion taylor``) if the cached ones lack them (the curves are kept);
``--width-per-layer`` measures the GQA group, shared-channel, layer and sublayer loss curves if the cached scores
lack them, and with ``--expert-channel-ratio`` the expert-channel curves.

The peer, llm-compressor's REAP modifier, runs from its own virtual environment on the same test bed and the
same calibration blocks (this script writes them beside the cached test bed): see bench/reap_peer.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import REPO, load_bench, machine, markdown
from moe_testbed import TEMPERATURE, build_testbed
from safetensors.torch import save_file
from transformers import Qwen2MoeForCausalLM

from gqa_prune import expert_scores
from gqa_prune.choices import EXPERT_GRADIENT_CRITERIA
from gqa_prune.criteria.experts import EXPERT_CRITERIA
from gqa_prune.expert_importance import (
    expert_channel_loss_curves,
    layer_loss_curves,
    score_experts,
    sublayer_loss_curves,
    width_loss_curves,
)
from gqa_prune.expert_plan import build_expert_plan
from gqa_prune.expert_reconstruct import refit_expert_plan
from gqa_prune.expert_scores import LAYER_KIND
from gqa_prune.expert_surgery import apply_expert_plan
from gqa_prune.moe import expert_geometry_of
from gqa_prune.passes import frozen, mean_loss
from gqa_prune.settings import ExpertPlanSettings, ReconstructionSettings

# --refit rows: none, the plan's units refit, units re-chosen by OBS and refit (row label suffixes)
REFITS = {False: "", "plan": ", refit", "obs": ", refit with units chosen by OBS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--criteria", default=",".join(EXPERT_CRITERIA))
    parser.add_argument(
        "--per-layer", default="reap,frequency", help="criteria also run with counts priced by measured loss curves"
    )
    parser.add_argument("--ranked", default="", help="criteria also run with experts ranked across layers")
    parser.add_argument(
        "--width-ratios", default="", help="plan --ratio values (GQA groups and shared channels) run with reap"
    )
    parser.add_argument(
        "--width-per-layer", action="store_true",
        help="also every width ratio with --experts per-layer: experts, GQA groups and shared channels priced "
        "against each other by their loss curves, per layer",
    )  # fmt: skip
    parser.add_argument(
        "--expert-channel-ratio", type=float, default=0.0,
        help="with --width-per-layer: also rows removing this share of expert channels, uniform and priced per layer",
    )  # fmt: skip
    parser.add_argument(
        "--refit", action="store_true",
        help="also every uniform width row with the least-squares refit of what the plan cut (prune --calib), of "
        "the plan's units and of units re-chosen by OBS",
    )  # fmt: skip
    parser.add_argument("--channel-multiple", type=int, default=16, help="kept expert widths in multiples of this")
    parser.add_argument("--curve-blocks", type=int, default=2, help="of those blocks, how many the loss curves use")
    parser.add_argument("--blocks", type=int, default=8, help="C4 calibration blocks of 2048 tokens")
    parser.add_argument("--testbed-blocks", type=int, default=4, help="of those, how many build the test bed")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared", type=int, default=1024, help="channels of each layer's shared expert")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="router scale (1e-3: uniform gates)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "bench" / "smollm2-moe")
    parser.add_argument("--peer-dirs", type=Path, nargs="*", default=[], help="checkpoints of bench/reap_peer.py")
    parser.add_argument("--json", type=Path, default=None, help="rows so far: a second run skips the rows it holds")
    args = parser.parse_args()

    bench = load_bench(n_blocks=args.blocks, max_tokens=args.max_tokens)
    suffix = "" if args.temperature == TEMPERATURE else f"-t{args.temperature:g}"
    cache = args.cache.with_name(f"{args.cache.name}-e{args.experts}-k{args.top_k}-s{args.shared}{suffix}")
    blocks_file = args.cache.with_name(f"experts-calib-{args.blocks}x2048.safetensors")
    if not blocks_file.is_file():  # the peer calibrates on exactly these blocks
        save_file({"input_ids": bench.blocks.contiguous()}, str(blocks_file))
    if (cache / "config.json").is_file():
        testbed = Qwen2MoeForCausalLM.from_pretrained(cache).eval()
    else:
        started = time.perf_counter()
        testbed = build_testbed(
            bench.model, bench.blocks[: args.testbed_blocks], args.experts, args.top_k, args.shared,
            temperature=args.temperature,
        )  # fmt: skip
        testbed.save_pretrained(cache)
        bench.tokenizer.save_pretrained(cache)
        print(f"test bed built in {time.perf_counter() - started:.0f} s -> {cache}")
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {row["method"] for row in rows}

    def add(method: str, model_of, experts: str | None) -> None:
        """One row; ``experts`` None: the pruned model's range of experts (and KV heads) per layer."""
        if method in done:
            return
        model = model_of()
        if experts is None:
            geometry = expert_geometry_of(model)
            counts = [geometry.experts[i] for i in geometry.moe_layers]
            heads = [geometry.kv_groups[i] for i in geometry.attention_layers]
            experts = f"{min(counts)}-{max(counts)} (KV heads {min(heads)}-{max(heads)}, {len(counts)} layers)"
        rows.append({
            "method": method, "experts per layer": experts,
            "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M",
            "ppl": round(bench.ppl(model).perplexity, 2),
        })  # fmt: skip
        print(rows[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    add("dense SmolLM2-135M", lambda: bench.model, "(dense MLP)")
    add(f"test bed: all experts (top-{args.top_k})", lambda: testbed, str(args.experts))
    statistics = {}
    wanted = {*args.criteria.split(","), *args.per_layer.split(","), *args.ranked.split(",")}
    gradients = bool(wanted & set(EXPERT_GRADIENT_CRITERIA))

    def top_up(asked: bool, kind: str, label: str, folder: Path, measures) -> None:
        """Measure the loss curves the cached scores lack (cached before they existed; the same model and
        blocks), each of ``measures`` returning kind -> per-layer curves, and save them."""
        if not (asked and statistics and kind not in statistics["scores"].width_curves):
            return
        started, cpu = time.perf_counter(), torch.device("cpu")
        cached = statistics["scores"]
        cached.geometry = expert_geometry_of(testbed)  # with the layer and sublayer sizes older caches lack
        measure = list(bench.blocks[: args.curve_blocks].split(1))
        with frozen(testbed):
            base = mean_loss(testbed, measure, cpu)
            for curves_of in measures:
                cached.width_curves.update(curves_of(testbed, cached, measure, cpu, base))
        expert_scores.save(cached, folder)
        print(f"{label} loss curves: {time.perf_counter() - started:.0f} s")

    with_curves = bool(args.per_layer or args.width_per_layer)  # only per-layer allocation reads loss curves

    def scores():
        folder = cache / f"importance-{args.blocks}x2048-c{args.curve_blocks if with_curves else 0}"
        if not statistics and expert_scores.is_expert_folder(folder):
            statistics["scores"] = expert_scores.load(folder)
            missing = "shared" not in statistics["scores"].statistics  # cached before shared channels were recorded
            if missing or (gradients and "taylor" not in statistics["scores"].statistics):
                curves = statistics["scores"].curves  # the same model and blocks: keep them, redo the statistics
                started = time.perf_counter()
                statistics["scores"] = score_experts(
                    testbed, bench.blocks, batch_size=1, curves=False, gradients=gradients
                )
                print(f"expert statistics (gradients: {gradients}): {time.perf_counter() - started:.0f} s")
                statistics["scores"].curves = curves
                expert_scores.save(statistics["scores"], folder)
        top_up(args.width_per_layer, LAYER_KIND, "GQA group, shared-channel and layer", folder, [
            width_loss_curves, lambda *inputs: {LAYER_KIND: layer_loss_curves(*inputs)},
        ])  # fmt: skip
        top_up(args.width_per_layer, "mlp", "attention-block and MoE-block", folder, [sublayer_loss_curves])
        top_up(args.expert_channel_ratio > 0 and args.width_per_layer, "channel", "expert-channel", folder, [
            lambda *inputs: {"channel": expert_channel_loss_curves(*inputs)},
        ])  # fmt: skip
        if not statistics:
            started = time.perf_counter()
            statistics["scores"] = score_experts(
                testbed,
                bench.blocks,
                batch_size=1,
                curves=with_curves,
                curve_blocks=args.curve_blocks,
                gradients=gradients,
            )
            expert_scores.save(statistics["scores"], folder)
            print(
                f"expert statistics and loss curves: {time.perf_counter() - started:.0f} s over {args.blocks} x "
                f"2048 tokens (curves: {args.curve_blocks} blocks)"
            )
        return statistics["scores"]

    def pruned(ratio: float, criterion: str, allocation: str, width_ratio: float = 0.0, refit=False, **options):
        settings = ExpertPlanSettings(ratio, criterion, allocation, width_ratio=width_ratio, **options)
        plan, model = build_expert_plan(scores(), settings), copy.deepcopy(testbed)
        if refit:
            started = time.perf_counter()
            plan, _ = refit_expert_plan(model, plan, bench.blocks, ReconstructionSettings().ridge, select=refit)
            print(f"refit: {time.perf_counter() - started:.0f} s", flush=True)
        return apply_expert_plan(model, plan)

    runs = [(criterion, "uniform") for criterion in args.criteria.split(",") if criterion]
    runs += [(criterion, "per-layer") for criterion in args.per_layer.split(",") if criterion]
    runs += [(criterion, "ranked") for criterion in args.ranked.split(",") if criterion]
    for ratio in (float(r) for r in args.ratios.split(",")):
        kept = args.experts - round(ratio * args.experts)
        for criterion, allocation in runs:
            method = f"{criterion} ({allocation}), {ratio:.0%} of experts removed"
            add(
                method,
                lambda: pruned(ratio, criterion, allocation),
                f"{kept} (mean)" if allocation != "uniform" else str(kept),
            )
    for width in (float(w) for w in args.width_ratios.split(",") if w):
        for ratio in (0.0, *(float(r) for r in args.ratios.split(","))):
            kept = args.experts - round(ratio * args.experts)
            for refit in REFITS if args.refit else (False,):
                add(
                    f"reap (uniform), {ratio:.0%} of experts + {width:.0%} of GQA groups and shared channels removed"
                    + REFITS[refit],
                    lambda: pruned(ratio, "reap", "uniform", width, refit),
                    str(kept),
                )
            for whole_layers in (False, True) if args.width_per_layer else ():
                layers = ", layers and sublayers" if whole_layers else ""
                add(
                    f"reap (per-layer: experts, groups, shared channels{layers} priced together), as much removed "
                    f"as {ratio:.0%} of experts + {width:.0%} of GQA groups and shared channels",
                    lambda: pruned(ratio, "reap", "per-layer", width, whole_layers=whole_layers),
                    None,
                )
            channel = args.expert_channel_ratio
            options = {"channel_ratio": channel, "channel_multiple": args.channel_multiple}
            for refit in REFITS if channel and args.refit else (False,) if channel else ():
                add(
                    f"reap (uniform), {ratio:.0%} of experts + {width:.0%} of GQA groups and shared channels + "
                    f"{channel:.0%} of expert channels removed" + REFITS[refit],
                    lambda: pruned(ratio, "reap", "uniform", width, refit, **options),
                    str(kept),
                )
            if channel and args.width_per_layer:
                add(
                    f"reap (per-layer: experts, expert channels, groups, shared channels, layers and sublayers priced "
                    f"together), as much removed as {ratio:.0%} of experts + {width:.0%} of GQA groups and shared "
                    f"channels + {channel:.0%} of expert channels",
                    lambda: pruned(ratio, "reap", "per-layer", width, whole_layers=True, **options),
                    None,
                )
    for folder in args.peer_dirs:
        record = json.loads((folder / "peer.json").read_text())
        peer = f"llm-compressor REAP {record['versions']['llmcompressor']}"
        experts = str(json.loads((folder / "config.json").read_text())["num_experts"])
        add(
            f"{peer}, {record['sparsity']:.0%} of experts removed",
            lambda: Qwen2MoeForCausalLM.from_pretrained(folder),
            experts,
        )
        report = folder.parent / f"{folder.name}.experts.json"
        if report.is_file():  # which experts the peer kept, against gqa-prune's reap on the same blocks
            plan = build_expert_plan(scores(), ExpertPlanSettings(record["sparsity"], "reap"))
            theirs = json.loads(report.read_text())
            same = sum(tuple(theirs.get(f"model.layers.{i}.mlp", ())) == plan.kept[i] for i in plan.geometry.moe_layers)
            print(f"{peer} at {record['sparsity']:.0%}: the same kept experts as gqa-prune's reap in {same} of "
                  f"{len(plan.geometry.moe_layers)} layers")  # fmt: skip

    for row in rows:  # the first two rows are the dense model and the whole test bed
        row["x dense"], row["x test bed"] = f"{row['ppl'] / rows[0]['ppl']:.2f}", f"{row['ppl'] / rows[1]['ppl']:.3f}"
    print()
    print(markdown(rows, ["method", "experts per layer", "parameters", "ppl", "x dense", "x test bed"]))
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
