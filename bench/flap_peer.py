"""Peer baseline: FLAP (CASIA-IVA-Lab/FLAP, AAAI 2024), its statistics, metric and compression from its checkout.

FLAP removes attention heads and MLP channels with no retraining: each output projection's input channels are
scored by the fluctuation of the channel over the calibration tokens times the squared norm of the weight
column they meet (WIFV), the scores are standardised per layer and module and compared across all layers at
once (AL-AM: adaptive structure), and what a removed channel contributed on average is added back as a bias of
``o_proj`` / ``down_proj`` (bias compensation). Its defaults are used: WIFV, AL-AM, bias compensation.

Run from its own code (``git clone https://github.com/CASIA-IVA-Lab/FLAP``, kept outside this repository): the
statistics are its ``lib.layerwrapper.BiasGPT``, the metric its ``lib.prune.metrics["WIFV"]`` and the MLP
compression its ``lib.prune.compress``. These are plain torch, so they run in this project's environment (FLAP
pins transformers 4.28 only for its own LLaMA modeling file, which is not used). What had to be adapted, because
FLAP's code is written for LLaMA-1's multi-head attention with 128-dimensional heads (``prune_flap`` reshapes by
128 and masks q, k and v with one head mask):

* the unit of attention is a GQA group (a KV head with its query heads), scored as the mean of its query heads'
  standardised channel scores (FLAP: the mean over one head's 128 channels); it is removed by zeroing its
  q/k/v rows, which makes its output exactly zero (FLAP's own ``unstr`` masking), and counted as removed;
* AL-AM weighs a unit by its parameters: a group has ``2 (G + 1) head_dim`` times the parameters of an MLP
  channel, ``512 / 3`` on SmolLM2 (9 query / 3 KV heads of 64), the same constant FLAP writes for a LLaMA head;
  FLAP's tensor of weights is an integer tensor, so the constant lands as 170, here too;
* ``prune_flap``'s orchestration (the standardisation, the global threshold) is repeated here, since it
  cannot be called with GQA; statistics come from one forward of the dense model over the calibration blocks,
  which is what FLAP's layer-by-layer loop feeds each layer (the dense outputs of the layer before);
* calibration is the same C4 blocks as every other row (FLAP's default: 2,048 x 128 WikiText-2 tokens), float32
  on CPU (FLAP: float16 on GPU).

``python bench/flap_peer.py CHECKOUT`` checks the adaptation: nothing removed gives the dense perplexity again,
and FLAP at 20 % with and without its bias compensation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

METRIC, STRUCTURE = "WIFV", "AL-AM"


def _flap(checkout: Path):
    """FLAP's ``lib`` package from ``checkout`` (its statistics, metrics and compression)."""
    sys.path.insert(0, str(checkout.resolve()))
    try:
        from lib import layerwrapper, prune
    finally:
        sys.path.pop(0)
    if not Path(prune.__file__).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"imported FLAP's lib from {prune.__file__}, not from {checkout}")
    return layerwrapper.BiasGPT, prune.metrics, prune.compress


def checkout_commit(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def describe_settings(checkout: Path) -> str:
    return f"FLAP {checkout_commit(checkout)}, {METRIC}, {STRUCTURE}, bias compensation; GQA groups as heads"


def _statistics(model, blocks: torch.Tensor, bias_gpt) -> list[dict]:
    """FLAP's BiasGPT statistics of every layer's o_proj and down_proj inputs over the calibration blocks."""
    wrapped, handles = [], []
    for layer in model.model.layers:
        subset = {"self_attn.o_proj": layer.self_attn.o_proj, "mlp.down_proj": layer.mlp.down_proj}
        wrapped.append({name: bias_gpt(module, METRIC) for name, module in subset.items()})
        for name, module in subset.items():
            record = wrapped[-1][name]
            hook = module.register_forward_hook(lambda _, inp, out, w=record: w.add_batch(inp[0].data, out.data))
            handles.append(hook)
    try:
        with torch.no_grad():
            for block in tqdm(blocks, desc="FLAP statistics", unit="block"):
                model(block[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return wrapped


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """FLAP's per-row standardisation (``prune_flap``'s ``standarlization``)."""
    return (x - torch.mean(x, axis=1, keepdim=True)) / torch.std(x, axis=1, keepdim=True)


def flap_prune(model, blocks: torch.Tensor, ratio: float, checkout: Path, bias: bool = True) -> tuple[object, int]:
    """Remove ``ratio`` of the attention+MLP projection parameters of a Llama-style GQA model with FLAP (in place).

    Returns the model and its parameter count (removed GQA groups are zeroed, not sliced, so they are subtracted
    here; the MLP is sliced by FLAP's own ``compress``)."""
    bias_gpt, metrics, compress = _flap(checkout)
    config, layers = model.config, model.model.layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    for layer in layers:  # FLAP's modeling file has these biases; a stock Llama does not
        for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
    wrapped = _statistics(model, blocks, bias_gpt)
    attn, mlp = [], []
    for layer, stats in zip(layers, wrapped):
        subset = {"self_attn.o_proj": layer.self_attn.o_proj, "mlp.down_proj": layer.mlp.down_proj}
        attn.append(metrics[METRIC](stats, subset, "self_attn.o_proj") ** 2)
        mlp.append(metrics[METRIC](stats, subset, "mlp.down_proj"))
    attn_metric = _standardise(torch.stack(attn)).reshape(len(layers), kv_heads, group * head_dim).mean(dim=2)
    mlp_metric = _standardise(torch.stack(mlp))

    prune_metric = torch.cat([attn_metric.view(-1), mlp_metric.view(-1)])
    sorted_prune, indices = torch.sort(prune_metric, descending=True)
    compression_weight = torch.ones_like(indices)  # an integer tensor, as in FLAP
    compression_weight[indices < attn_metric.numel()] = 2 * (group + 1) * head_dim / 3
    target = torch.sum(compression_weight) * (1 - ratio)
    threshold = sorted_prune[torch.argmin(torch.abs(torch.cumsum(compression_weight, 0) - target))]
    attn_mask, mlp_mask = attn_metric > threshold, mlp_metric > threshold

    removed = 0
    for layer, stats, groups, channels in zip(layers, wrapped, attn_mask, mlp_mask):
        attention = layer.self_attn
        kept = groups.repeat_interleave(group * head_dim)  # o_proj input channels; query heads are group-major
        if bias:
            baseline = stats["self_attn.o_proj"].baseline_inp
            attention.o_proj.bias.data = (baseline * ~kept) @ attention.o_proj.weight.data.T
        attention.q_proj.weight.data *= kept.unsqueeze(-1)
        kv_kept = groups.repeat_interleave(head_dim).unsqueeze(-1)
        attention.k_proj.weight.data *= kv_kept
        attention.v_proj.weight.data *= kv_kept
        removed += int((~groups).sum()) * 2 * (group + 1) * head_dim * config.hidden_size
        compress(layer, None, channels, None, stats["mlp.down_proj"].baseline_inp, "cpu", bias=bias)
        for name in stats:
            stats[name].free()
    if not bias:
        for layer in layers:
            layer.self_attn.o_proj.bias = layer.mlp.down_proj.bias = None
    return model, sum(p.numel() for p in model.parameters()) - removed


def main() -> None:
    """Nothing removed = the dense perplexity; FLAP at 20 % with and without bias compensation."""
    import argparse
    import copy

    from common import load_bench

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    args = parser.parse_args()
    bench = load_bench(n_blocks=2, block_len=512, max_tokens=4096)
    print(f"{describe_settings(args.checkout)}; dense {bench.ppl(bench.model).perplexity:.2f} PPL")
    for ratio, bias in ((0.0, True), (0.2, True), (0.2, False)):
        model, parameters = flap_prune(copy.deepcopy(bench.model), bench.blocks, ratio, args.checkout, bias=bias)
        print(f"ratio {ratio:.2f}, bias compensation {bias}: {parameters:,} parameters, "
              f"{bench.ppl(model).perplexity:.2f} PPL (first 4,096 WikiText-2 tokens)")  # fmt: skip


if __name__ == "__main__":
    main()
