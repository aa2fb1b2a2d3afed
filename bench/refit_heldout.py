"""Why the refit cannot close the gap on SmolLM2: how much of its calibration gain survives on text it did not
see. Single MLPs of the dense model (no upstream pruning), each losing ``--removed`` of its channels chosen by
greedy structured OBS; down_proj refit by the defaults' ridge least squares on the first N of the C4
calibration blocks (seed 0); relative output error ||W x - W' x_K||^2 / ||W x||^2 sliced and refit, on those
blocks, on 4 other C4 blocks (seed 1) and on the first 8,192 WikiText-2 test tokens (the evaluation text).

    python bench/refit_heldout.py [--layers 3,15,26] [--removed 512,768] [--fit-blocks 8,32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import DATA_DIR, REPO, load_bench, markdown

from gqa_prune.criteria.obs import greedy_obs_keep
from gqa_prune.data import calibration_blocks, read_documents
from gqa_prune.reconstruct import refit_columns
from gqa_prune.settings import ReconstructionSettings

BLOCK = 2048


def mlp_inputs(model: torch.nn.Module, blocks: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The inputs of each listed layer's MLP over ``blocks``, [tokens, hidden]."""
    store: dict[int, list[torch.Tensor]] = {index: [] for index in layers}
    handles = [
        model.model.layers[index].mlp.register_forward_pre_hook(
            lambda module, args, index=index: store[index].append(args[0].detach().flatten(0, -2))
        )
        for index in layers
    ]
    try:
        with torch.no_grad():
            for block in blocks:
                model.model(block[None])
    finally:
        for handle in handles:
            handle.remove()
    return {index: torch.cat(parts) for index, parts in store.items()}


def relative_error(inputs: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, columns: torch.Tensor) -> float:
    target = inputs @ weight.T
    return float(((inputs[:, kept] @ columns.T - target) ** 2).sum() / (target**2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,15,26")
    parser.add_argument("--removed", default="512,768", help="MLP channels removed (of 1536)")
    parser.add_argument("--fit-blocks", default="8,32", help="calibration blocks the refit sees")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "refit-heldout.jsonl")
    args = parser.parse_args()
    layers = [int(part) for part in args.layers.split(",")]
    fit_blocks = [int(part) for part in args.fit_blocks.split(",")]
    bench = load_bench(n_blocks=max(fit_blocks))
    model, ridge = bench.model, ReconstructionSettings().ridge
    documents = read_documents(str(DATA_DIR / "c4" / "sample_c4-rp1.jsonl"))
    texts = {
        "calibration": bench.blocks,
        "other C4": calibration_blocks(bench.tokenizer, documents, 4, BLOCK, seed=1),
        "WikiText-2": bench.wikitext[: 4 * BLOCK].view(4, BLOCK),
    }
    captured = {name: mlp_inputs(model, blocks, layers) for name, blocks in texts.items()}
    rows = []
    for index in layers:
        mlp = model.model.layers[index].mlp
        weight = mlp.down_proj.weight.detach().to(torch.float64)
        with torch.no_grad():
            activations = {
                name: (mlp.act_fn(mlp.gate_proj(inputs[index])) * mlp.up_proj(inputs[index])).to(torch.float64)
                for name, inputs in captured.items()
            }
        for blocks in fit_blocks:
            fitted = activations["calibration"][: blocks * BLOCK]
            gram = fitted.T @ fitted
            for removed in (int(part) for part in args.removed.split(",")):
                kept = greedy_obs_keep(weight, gram, 1, removed, ridge=ridge)
                refit = refit_columns(weight, gram, kept, ridge)
                row = {"layer": index, "removed": removed, "fit blocks": blocks}
                for name, inputs in activations.items():
                    inputs = fitted if name == "calibration" else inputs
                    sliced = relative_error(inputs, weight, kept, weight[:, kept])
                    after = relative_error(inputs, weight, kept, refit)
                    row[name] = f"{sliced:.3f} → {after:.3f} (−{1 - after / sliced:.0%})"
                rows.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(markdown(rows, ["layer", "removed", "fit blocks", *texts]))
    print(bench.describe())


if __name__ == "__main__":
    main()
