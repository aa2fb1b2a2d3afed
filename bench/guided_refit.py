"""Loss-guided refit, a lever measured for issue 25 (it gains too little to become a default): the defaults'
reconstruction (OBS choice of units, ridge 0.3) with its layer-wise objective weighted by how much the LM loss
depends on each output, as GuidedQuant (arXiv 2505.07004) weights GPTQ's objective.

With g the gradient of the dense model's next-token loss at an output projection's output (o_proj, down_proj:
the residual stream), the weight of token t and output o is approximated as separable, g_to^2 ~ w_t f_o:

- ``out``: f_o = sum_t g_to^2 weights the rows of W in the OBS choice of units (the refit of each row is the
  same least-squares problem whatever its weight, so only the choice changes);
- ``tok``: w_t = sum_o g_to^2 (raised to ``--power``, then mean 1) weights each token's share of the Gram, so
  both the choice and the refit change;
- ``none``: the defaults (the control row).

The hybrid Taylor plan from bench/quality.py's cached scores (8 x 2048 C4 tokens), refit on the same blocks,
WikiText-2 perplexity (windows of 2048, first 16,384 tokens). The gradient statistics are computed once (one
forward + backward per block) and cached as safetensors. Appends one JSON line per setting to --out.

    python bench/guided_refit.py [--ratio 0.2] [--settings none,out,tok:0.5]

This wraps two of gqa_prune.reconstruct's module-level helpers (the Gram and the OBS choice) for the run; the
library itself has no such option.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import REPO, load_bench, markdown
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gqa_prune import reconstruct as refit_module
from gqa_prune import scores as stored
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.surgery import apply_plan

PROJECTIONS = {"o_proj": lambda layer: layer.self_attn.o_proj, "down_proj": lambda layer: layer.mlp.down_proj}


def gradient_statistics(model: torch.nn.Module, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per output projection ``name.layer``: ``tok.*`` [blocks, tokens] = sum_o g^2, ``out.*`` [out] = sum_t g^2."""
    grads: dict[str, torch.Tensor] = {}

    def keep_gradient(key: str):
        def hook(module, args, output):
            output.register_hook(lambda gradient: grads.__setitem__(key, gradient.detach()))

        return hook

    handles = [
        PROJECTIONS[name](layer).register_forward_hook(keep_gradient(f"{name}.{index}"))
        for index, layer in enumerate(model.model.layers)
        for name in PROJECTIONS
    ]
    per_token: dict[str, list[torch.Tensor]] = {}
    per_output: dict[str, torch.Tensor] = {}
    try:
        for block in tqdm(blocks, desc="loss gradients", unit="block"):
            grads.clear()
            model(block[None], labels=block[None]).loss.backward()
            for key, gradient in grads.items():
                squared = gradient[0].to(torch.float64) ** 2
                per_token.setdefault(key, []).append(squared.sum(1))
                per_output[key] = per_output.get(key, 0) + squared.sum(0)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {
        **{f"tok.{key}": torch.stack(rows) for key, rows in per_token.items()},
        **{f"out.{key}": total for key, total in per_output.items()},
    }


@contextlib.contextmanager
def guided(model: torch.nn.Module, statistics: dict[str, torch.Tensor], mode: str, power: float) -> Iterator[None]:
    """Within the block, reconstruct() weights its Grams (``tok``) or its OBS choice (``out``) as described."""
    index_of = {id(layer): index for index, layer in enumerate(model.model.layers)}
    current: dict[str, str] = {}
    plain_gram, plain_obs = refit_module._gram, refit_module.greedy_obs_keep

    def gram(layer, projection, captured, dense):
        name = "o_proj" if projection is layer.self_attn.o_proj else "down_proj"
        current["key"] = f"{name}.{index_of[id(layer)]}"
        if mode != "tok":
            return plain_gram(layer, projection, captured, dense)
        weights = statistics[f"tok.{current['key']}"]
        weights = (weights / weights.mean()) ** power
        weights = weights / weights.mean()
        total, inputs = None, []
        handle = projection.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
        try:
            with torch.no_grad():
                for block, (hidden, kwargs) in enumerate(zip(captured.hidden, captured.kwargs)):
                    refit_module.run_layer(layer, hidden, kwargs)
                    x = inputs.pop().flatten(0, -2).to(torch.float64) * weights[block].sqrt().unsqueeze(1)
                    total = x.T @ x if total is None else total + x.T @ x
        finally:
            handle.remove()
        return total, None

    def obs(weight, gram_matrix, width, remove, ridge):
        if mode != "out":
            return plain_obs(weight, gram_matrix, width, remove, ridge)
        rows = statistics[f"out.{current['key']}"]
        rows = (rows / rows.mean()).to(weight.dtype)
        return plain_obs(weight * rows.sqrt().unsqueeze(1), gram_matrix, width, remove, ridge)

    refit_module._gram, refit_module.greedy_obs_keep = gram, obs
    try:
        yield
    finally:
        refit_module._gram, refit_module.greedy_obs_keep = plain_gram, plain_obs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--settings", default="none,out,tok:0.5", help="mode[:power], comma-separated")
    parser.add_argument("--scores", type=Path, default=REPO / "results" / "bench" / "quality-taylor-8x2048")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "guided-refit.jsonl")
    args = parser.parse_args()
    bench = load_bench()
    cache = REPO / "results" / "bench" / "guided-gradients-8x2048.safetensors"
    if cache.is_file():
        statistics = load_file(cache)
    else:
        statistics = gradient_statistics(bench.model, bench.blocks)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(statistics, cache)
    plan = build_plan(stored.load(args.scores), PlanSettings(ratio=args.ratio, mode="hybrid"))
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    for setting in args.settings.split(","):
        mode, _, power = setting.partition(":")
        if mode not in ("none", "out", "tok"):
            raise SystemExit(f"setting {setting!r}: the mode must be none, out or tok[:power]")
        key = [setting, args.ratio]
        if any(entry["key"] == key for entry in done):
            continue
        model = copy.deepcopy(bench.model)
        start = time.perf_counter()
        with guided(model, statistics, mode, float(power or 1.0)):
            applied, _ = refit_module.reconstruct(
                model, plan, bench.blocks, refit_module.ReconstructionSettings(ridge=0.3, select="obs")
            )
        apply_plan(model, applied)
        done.append({"key": key, "ppl": bench.ppl(model).perplexity, "s": time.perf_counter() - start})
        with args.out.open("a") as handle:
            handle.write(json.dumps(done[-1]) + "\n")
    rows = [{"setting": entry["key"][0], "ratio": entry["key"][1], "PPL": f"{entry['ppl']:.2f}",
             "seconds": f"{entry['s']:.0f}"} for entry in done]  # fmt: skip
    print(markdown(rows, ["setting", "ratio", "PPL", "seconds"]))
    print(bench.describe())


if __name__ == "__main__":
    main()
