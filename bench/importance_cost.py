"""What unit scores cost on SmolLM2-135M: one-pass Taylor vs the seeds' scheme, and Fisher and OBS beside Taylor.

1. One-pass Taylor vs the seeds' scheme (one forward+backward per layer): the same calibration blocks, the
   same gradient set (projection weights and biases) and the same reduction to unit scores; they differ
   only in passes: gqa-prune folds every layer's |w * dL/dw| during a single backward per batch, the seeds'
   code re-ran forward+backward for each layer it scored. Prints passes, wall time of each, their ratio,
   and how far the scores differ (they must agree).
2. The unit criteria side by side (taylor, fisher, obs; loss curves off, so only the scoring passes count):
   wall time and passes of each on the same blocks.

    python bench/importance_cost.py [--model resources/models/smollm2-135m] [--blocks 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from gqa_prune import importance
from gqa_prune.arch import ALL_ROLES, adapter_for, geometry_of
from gqa_prune.criteria import UNIT_CRITERIA
from gqa_prune.data import calibration_blocks, read_documents
from gqa_prune.reduce import bias_to_units, taylor_salience, weight_to_units
from gqa_prune.sources import load_model, load_tokenizer, stage
from gqa_prune.units import WIDTH_KINDS, width_kind

REPO = Path(__file__).resolve().parents[1]


def per_layer_passes(model, blocks: torch.Tensor, batch_size: int) -> tuple[dict[str, list[torch.Tensor]], int]:
    """The seeds' scheme: for every layer, forward+backward over the calibration batches, read that layer's grads."""
    adapter, geometry = adapter_for(model.config), geometry_of(model)
    units = {
        kind.name: [torch.zeros(kind.count(geometry, i)) for i in range(geometry.num_layers)] for kind in WIDTH_KINDS
    }
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projections = [
        (layer, role, adapter.projection(layer, role)) for layer in adapter.decoder_layers(model) for role in ALL_ROLES
    ]
    for _, role, projection in projections:
        projection.weight.requires_grad_(True)
        if role.axis == "out" and projection.bias is not None:
            projection.bias.requires_grad_(True)
    passes = 0
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        for batch in blocks.split(batch_size):
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            passes += 1
            for role in ALL_ROLES:
                projection = adapter.projection(layer, role)
                width = geometry.indices_per_unit(role)
                target = units[width_kind(role.unit).name][layer_index]
                target.add_(weight_to_units(taylor_salience(projection.weight, projection.weight.grad), role, width))
                if role.axis == "out" and projection.bias is not None:
                    target.add_(bias_to_units(taylor_salience(projection.bias, projection.bias.grad), width))
        print(f"  seeds' scheme: layer {layer_index + 1}/{geometry.num_layers} scored", flush=True)
    model.zero_grad(set_to_none=True)
    return units, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "resources/models/smollm2-135m")
    parser.add_argument("--calib-source", default=str(REPO.parent / "shared/data/c4/sample_c4-rp1.jsonl"))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    if not (args.model / "config.json").is_file():
        stage("embedded:smollm2-135m", args.model)
    model = load_model(args.model, device="cpu")
    blocks = calibration_blocks(
        load_tokenizer(args.model), read_documents(args.calib_source), args.blocks, args.seq_len, seed=0
    )
    batches = len(blocks.split(args.batch_size))
    print(
        f"model {args.model.name}: {geometry_of(model).num_layers} layers; "
        f"calibration {args.blocks} x {args.seq_len} tokens, "
        f"{batches} batch(es) of {args.batch_size}; torch threads {torch.get_num_threads()}"
    )

    start = time.perf_counter()
    one_pass = importance.score(model, blocks, "taylor", layer_criteria=(), batch_size=args.batch_size, curves=False)
    one_pass_seconds = time.perf_counter() - start

    start = time.perf_counter()
    seeds_units, seeds_passes = per_layer_passes(copy.deepcopy(model), blocks, args.batch_size)
    seeds_seconds = time.perf_counter() - start

    pairs = [(a, b) for kind in seeds_units for a, b in zip(one_pass.units[kind], seeds_units[kind])]
    absolute = max((a - b).abs().max().item() for a, b in pairs)
    relative = max(((a - b).abs() / b.abs().clamp_min(1e-12)).max().item() for a, b in pairs)
    print()
    print(f"{'scheme':<34}{'fwd+bwd passes':>15}{'wall time (s)':>15}")
    print(f"{'gqa-prune one pass':<34}{one_pass.info['forward_backward_passes']:>15}{one_pass_seconds:>15.1f}")
    print(f"{'seeds: one pass per layer':<34}{seeds_passes:>15}{seeds_seconds:>15.1f}")
    print(f"speed-up: {seeds_seconds / one_pass_seconds:.1f}x (goal >= 10x)")
    print(
        f"scores: max |difference| {absolute:.3e}, max relative difference {relative:.3e} "
        f"({'agree' if relative < 1e-4 else 'DISAGREE'})"
    )

    print(f"\n{'criterion':<12}{'wall time (s)':>15}  what it runs")
    for criterion in ("taylor", "fisher", "obs"):
        start = time.perf_counter()
        result = importance.score(model, blocks, criterion, layer_criteria=(), batch_size=args.batch_size, curves=False)
        seconds = time.perf_counter() - start
        passes = result.info["forward_backward_passes"]
        print(f"{criterion:<12}{seconds:>15.1f}  {UNIT_CRITERIA[criterion].description}; {passes} fwd+bwd passes")


if __name__ == "__main__":
    main()
