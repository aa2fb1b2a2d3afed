"""A lever that lost: allocate the hybrid plan per layer by each layer's own loss curves, measured with the refit
in view, instead of per kind (the defaults: kind curves, block influence across layers).

For every layer of SmolLM2-135M alone: remove 1 or 2 GQA groups, or 256 / 512 / 768 / 1024 / 1152 MLP channels,
chosen by greedy structured OBS on the dense activations' Gram, refit o_proj / down_proj (ridge 0.3, as
`gqa-prune prune --calib` does), and measure the calibration loss on the first 2048-token C4 block; also the
attention block, the MLP block and the whole layer bypassed. Then hand the budget out step by step (one group,
128 channels, or a whole block / layer) by loss per parameter (``allocation.split_by_steps``), keep each layer's
top Taylor units (the refit re-chooses them by OBS), run the defaults' reconstruction on the 8 x 2048 blocks and
measure WikiText-2 perplexity as bench/quality.py does. The defaults' row on the same 8 blocks: 30.41.

    cd bench && python per_layer_curves.py [--ratio 0.2] [--skip group,attn_sub]

``--skip`` leaves candidate kinds out (group, mlp, attn_sub, mlp_sub, layer). The curves (about 45 min here,
one forward from the changed layer on per point) are cached in results/bench/per-layer-curves-8x2048.json;
the Taylor scores are bench/quality.py's (results/bench/quality-taylor-8x2048, `--blocks 8`).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO, load_bench
from tqdm import tqdm

from gqa_prune import scores as stored
from gqa_prune.allocation import split_by_steps
from gqa_prune.arch import adapter_for, geometry_of
from gqa_prune.criteria.obs import greedy_obs_keep
from gqa_prune.passes import OUTPUT_ROLE, capture_layer_inputs, run_layer
from gqa_prune.planning import LayerPlan, PlanSettings, build_plan, top_units
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct, refit_columns
from gqa_prune.scores import LossCurve
from gqa_prune.settings import default_of
from gqa_prune.surgery import apply_plan
from gqa_prune.units import ATTN_SUBLAYER, GQA_GROUP, LAYER, MLP_CHANNEL, MLP_SUBLAYER

RIDGE = default_of(ReconstructionSettings, "ridge")  # the defaults' refit, as `prune --calib` runs it
MULTIPLE = default_of(PlanSettings, "channel_multiple")  # an MLP step of the plans: 128 channels
MAX_RATE = default_of(PlanSettings, "max_rate")  # the most of a layer's units a plan removes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--curve-blocks", type=int, default=1, help="blocks the curve losses are measured on")
    parser.add_argument("--curves", type=Path, default=REPO / "results" / "bench" / "per-layer-curves-8x2048.json")
    parser.add_argument(
        "--skip", default="", help="comma-separated candidate kinds left out (group, mlp, attn_sub, ...)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    bench = load_bench()
    model = bench.model.eval()
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    geometry = geometry_of(model)
    scores = stored.load(REPO / "results" / "bench" / "quality-taylor-8x2048")
    if args.curves.is_file():
        curves_raw = json.loads(args.curves.read_text())
    else:
        curves_raw = measure(model, adapter, layers, geometry, bench.blocks, args.curve_blocks)
        args.curves.write_text(json.dumps(curves_raw))
    curves, steps, wholes = {}, {}, {}
    ppg, ppc = geometry.params_per_group, geometry.params_per_channel
    for entry in curves_raw:  # per layer: group, mlp, then the wholes that contain them
        kind, layer = entry["kind"], entry["layer"]
        if kind in args.skip.split(","):
            continue
        curves[kind, layer] = LossCurve(tuple((int(p), float(v)) for p, v in entry["points"])).loss
        if kind == "group":  # every layer keeps a group
            steps[kind, layer] = [k * ppg for k in range(1, geometry.kv_groups[layer])]
        elif kind == "mlp":  # at most MAX_RATE of the channels, in plan steps
            most = int(MAX_RATE * geometry.intermediate_sizes[layer]) // MULTIPLE
            steps[kind, layer] = [k * MULTIPLE * ppc for k in range(1, most + 1)]
        elif kind == "attn_sub":
            steps[kind, layer] = [geometry.attention_params(layer)]
            wholes[kind, layer] = [key for key in [("group", layer)] if key in curves]
        elif kind == "mlp_sub":
            steps[kind, layer] = [geometry.mlp_params(layer)]
            wholes[kind, layer] = [key for key in [("mlp", layer)] if key in curves]
        else:
            steps[kind, layer] = [geometry.attention_params(layer) + geometry.mlp_params(layer)]
            wholes[kind, layer] = [key for key in curves if key[1] == layer and key[0] != "layer"]
    target = args.ratio * geometry.unit_params()
    taken = split_by_steps(curves, steps, target, wholes)
    base = build_plan(scores, PlanSettings(ratio=args.ratio, mode="hybrid"))
    plans = []
    for index in range(geometry.num_layers):
        removed = []
        if taken.get(("layer", index)):
            removed = ["layer"]
        else:
            if taken.get(("attn_sub", index)):
                removed.append("attn_sublayer")
            if taken.get(("mlp_sub", index)):
                removed.append("mlp_sublayer")
        kept = {}
        if "layer" not in removed and "attn_sublayer" not in removed:
            groups = geometry.kv_groups[index] - taken.get(("group", index), 0)
            kept["gqa_group"] = top_units(scores.units["gqa_group"][index], groups)
        if "layer" not in removed and "mlp_sublayer" not in removed:
            channels = geometry.intermediate_sizes[index] - MULTIPLE * taken.get(("mlp", index), 0)
            kept["mlp_channel"] = top_units(scores.units["mlp_channel"][index], channels)
        plans.append(LayerPlan(index, 0.0, kept, tuple(removed), {}, ()))
    plan = replace(base, layers=tuple(plans))

    def lost(layers) -> list[tuple]:
        """Per layer: (index, blocks removed, GQA groups lost, MLP channels lost)."""
        return [
            (p.layer, p.removed, geometry.kv_groups[p.layer] - len(p.kept.get("gqa_group", ())),
             geometry.intermediate_sizes[p.layer] - len(p.kept.get("mlp_channel", ())))
            for p in layers
        ]  # fmt: skip

    print("plan", lost(plans), "params_after", plan.params_after, "base", base.params_after, flush=True)
    print("base plan", lost(base.layers), flush=True)
    work = copy.deepcopy(model)
    start = time.perf_counter()
    applied, _ = reconstruct(work, plan, bench.blocks, ReconstructionSettings())
    apply_plan(work, applied)
    print(json.dumps({"ratio": args.ratio, "skip": args.skip, "ppl": bench.ppl(work).perplexity,
                      "params": plan.params_after, "s": time.perf_counter() - start}), flush=True)  # fmt: skip


def measure(model, adapter, layers, geometry, blocks, curve_blocks):
    """Every layer's curves (see above): a list of {kind, layer, points [(parameters removed, nats)]}."""
    batches = list(blocks.split(1))
    captured = capture_layer_inputs(model, layers, batches, "cpu")
    kwargs = captured.kwargs
    hidden = captured.hidden
    inputs_at = []  # curve blocks' hidden states entering each layer
    grams = []
    for layer in tqdm(layers, desc="dense pass"):
        inputs_at.append([h.clone() for h in hidden[:curve_blocks]])
        store = {"o": None, "d": None}
        o_proj, down = adapter.projection(layer, OUTPUT_ROLE["attn"]), adapter.projection(layer, OUTPUT_ROLE["mlp"])

        def hook(name):
            def grab(module, args):
                x = args[0].detach().flatten(0, -2).to(torch.float64)
                store[name] = x.T @ x if store[name] is None else store[name] + x.T @ x

            return grab

        handles = [o_proj.register_forward_pre_hook(hook("o")), down.register_forward_pre_hook(hook("d"))]
        with torch.no_grad():
            hidden = [run_layer(layer, h, k) for h, k in zip(hidden, kwargs)]
        for handle in handles:
            handle.remove()
        grams.append((store["o"], store["d"]))
    labels = [b for b in batches[:curve_blocks]]

    def loss_from(index, changed):
        total = 0.0
        with torch.no_grad():
            for b, (h, k) in enumerate(zip(inputs_at[index], kwargs[:curve_blocks])):
                h = run_layer(changed, h, k)
                for j in range(index + 1, len(layers)):
                    h = run_layer(layers[j], h, k)
                logits = model.lm_head(model.model.norm(h)).float()
                total += F.cross_entropy(logits[0, :-1], labels[b][0, 1:]).item()
        return total / curve_blocks

    base = loss_from(0, layers[0])
    print("base loss", base, flush=True)
    out = []
    ppg, ppc = geometry.params_per_group, geometry.params_per_channel
    for index, layer in enumerate(tqdm(layers, desc="per-layer curves")):
        gram_o, gram_d = grams[index]
        widths = (
            ("group", GQA_GROUP, gram_o, geometry.indices_per_unit(OUTPUT_ROLE["attn"]), (1, 2), ppg),
            ("mlp", MLP_CHANNEL, gram_d, 1, (256, 512, 768, 1024, 1152), ppc),
        )
        for name, kind, gram, width, counts, per_unit in widths:
            role = OUTPUT_ROLE[kind.scopes[0]]
            original = adapter.projection(layer, role).weight
            points = []
            for count in counts:
                changed = copy.deepcopy(layer)
                kept = tuple(int(u) for u in greedy_obs_keep(original, gram, width, count, RIDGE))
                kind.mask(changed, adapter, geometry, kept)
                _refit(adapter.projection(changed, role), original, gram, kind.kept_indices(role, geometry, kept))
                points.append((count * per_unit, loss_from(index, changed) - base))
            out.append({"kind": name, "layer": index, "points": points})
        for kind, unit, params in (
            ("attn_sub", ATTN_SUBLAYER, geometry.attention_params(index)),
            ("mlp_sub", MLP_SUBLAYER, geometry.mlp_params(index)),
            ("layer", LAYER, geometry.attention_params(index) + geometry.mlp_params(index)),
        ):
            changed = copy.deepcopy(layer)
            with torch.no_grad():
                unit.mask(changed, adapter)
            out.append({"kind": kind, "layer": index, "points": [(params, loss_from(index, changed) - base)]})
        print(index, [e["points"] for e in out[-5:]], flush=True)
    return out


def _refit(projection, original, gram, kept) -> None:
    """Zero the projection's columns outside ``kept`` and refit the kept ones (the defaults' ridge)."""
    refit = refit_columns(original, gram, kept, RIDGE)
    with torch.no_grad():
        weight = torch.zeros_like(projection.weight)
        weight[:, kept] = refit.to(weight.dtype)
        projection.weight.copy_(weight)


if __name__ == "__main__":
    main()
