"""Peer baseline: width pruning with the PyPI package ``torch-pruning`` (VainF/Torch-Pruning, DepGraph).

Follows the GQA settings of its LLM example (``examples/LLMs/prune_llm.py``): ``tp.pruner.MetaPruner`` with
``num_heads={q_proj: num_attention_heads, k_proj: num_key_value_heads, v_proj: num_key_value_heads}`` per layer,
``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact), ``global_pruning=False`` (the same
amount in every layer), ``round_to=4`` and ``lm_head`` ignored. Deviations, and why:

* importance is ``tp.importance.GroupTaylorImportance()`` (|w * dL/dw| summed over each coupled group), from
  gradients of the causal-LM loss (labels = input ids) accumulated over the calibration blocks before
  ``pruner.step()``, instead of the example's weight-magnitude ``GroupNormImportance``;
* ``embed_tokens`` is ignored too, which makes DepGraph's hidden-size group (embeddings, RMSNorms, input
  channels of every projection, output channels of ``o_proj`` / ``down_proj``) unprunable: the residual width
  never shrinks, only attention heads and MLP intermediate channels are removed;
* ``head_pruning_ratio`` and the MLP ratio (``pruning_ratio_dict`` on each ``mlp``) are solved from ``ratio`` so
  that the removed share of q/k/v/o + gate/up/down weights is as close to ``ratio`` as the granularity allows:
  attention takes the head count closest to ``ratio`` of its own weights, the MLP (steps keeping a multiple of
  4 channels) makes up the total. Attention's ``pruning_ratio_dict`` entry is 1.0: with
  ``prune_head_dims=False`` it removes no dimensions, it only lets head pruning run (torch-pruning skips a
  group whose channel ratio rounds to zero removed channels);
* the dependency graph is traced with eager attention: with SDPA's native GQA (``enable_gqa``) DepGraph treats
  attention as element-wise and never sees the KV-to-query expansion; ``repeat_kv`` (expand + reshape) it maps.

What torch-pruning 1.6.1 does with GQA: it never removes key/value heads (their pruning indices are emptied
"since they will be shared by multiple Q heads"); it removes the same number of the least important query
heads inside every KV group. The pairing survives (each KV group keeps an equal number of its own query heads)
but whole GQA groups are never removed: k_proj / v_proj keep all their weights and
``num_attention_heads // num_key_value_heads`` drops. Head scores use q_proj rows and o_proj columns only.
Asking for G - 1 of G query heads per group fails silently (q/k/v then have equal head counts, the GQA special
case is skipped, the group is rejected, nothing is removed), so with G query heads per KV head attention sheds
at most ``(G - 2) / (G + 1)`` of its projection weights, in steps of ``1 / (G + 1)`` (nothing when G = 2).
Plain multi-head attention (G = 1) prunes whole q/k/v/o heads.
"""

from __future__ import annotations

import logging
from importlib.metadata import version

import torch
import torch_pruning as tp

log = logging.getLogger(__name__)

ROUND_TO = 4


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


def _plan(config: object, ratio: float) -> tuple[float, int, int]:
    """(head_pruning_ratio, heads removed per KV group, MLP channels removed per layer) for ``ratio``."""
    hidden, inter = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // hq
    attn, mlp = 2 * (hq + hkv) * head_dim * hidden, 3 * inter * hidden  # per layer
    if hq == hkv:  # MHA: a head is q/k/v rows + o columns
        per_step, most = 4 * head_dim * hidden, hq - 1
    else:  # GQA: one query head from every KV group (q rows + o columns); G - 1 fails in 1.6.1, see module doc
        per_step, most = 2 * hkv * head_dim * hidden, max(hq // hkv - 2, 0)
    n = min(max(round(ratio * attn / per_step), 0), most)
    step = ROUND_TO if inter % ROUND_TO == 0 else 1
    channels = round((ratio * (attn + mlp) - n * per_step) / (3 * hidden) / step) * step
    channels = min(max(channels, 0), inter - step)
    # torch-pruning truncates / ceils float products: aim half a unit off to land exactly on n and channels
    heads_removed = n if hq == hkv else n * hkv
    return max(heads_removed - 0.5, 0.0) / hq, n, channels


def _accumulate_gradients(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
    """Mean causal-LM loss gradient over ``blocks`` into ``.grad`` (what GroupTaylorImportance reads)."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    n = blocks.shape[0]
    with torch.enable_grad():
        for start in range(0, n, batch_size):
            ids = blocks[start : start + batch_size].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * ids.shape[0] / n).backward()


def torch_pruning_prune(
    model: torch.nn.Module, blocks: torch.Tensor, ratio: float, batch_size: int = 1
) -> torch.nn.Module:
    """Prune a HF Llama/Qwen2/Mistral causal LM in place with torch-pruning (Taylor importance on ``blocks``).

    ``blocks`` are calibration token ids [n, seq_len]; ``ratio`` is the target fraction of attention + MLP
    projection weights to remove. Query heads (the same number from every KV group) and MLP intermediate
    channels are removed, the hidden size is kept. Module attributes and the config are updated as in
    torch-pruning's LLM example. Returns ``model``.
    """
    model.eval()
    cfg = model.config
    head_ratio, n_heads, channels = _plan(cfg, ratio)
    log.info(
        "torch-pruning: ratio %.3f -> %d heads per KV group, %d/%d MLP channels per layer",
        ratio,
        n_heads,
        channels,
        cfg.intermediate_size,
    )
    if n_heads == 0 and channels == 0:
        return model

    num_heads: dict[torch.nn.Module, int] = {}
    ratio_dict: dict[torch.nn.Module, float] = {}
    for layer in _layers(model):
        attn = layer.self_attn
        num_heads.update(
            {
                attn.q_proj: cfg.num_attention_heads,
                attn.k_proj: cfg.num_key_value_heads,
                attn.v_proj: cfg.num_key_value_heads,
            }
        )
        ratio_dict[attn] = 1.0  # gate only: prune_head_dims=False removes no head dimensions
        ratio_dict[layer.mlp] = max(channels - 0.5, 0.0) / cfg.intermediate_size

    _accumulate_gradients(model, blocks, batch_size)
    example = blocks[:1, : min(blocks.shape[1], 16)].to(next(model.parameters()).device)
    attn_impl = model.config._attn_implementation
    model.set_attn_implementation("eager")  # see module doc: DepGraph cannot follow SDPA's native GQA
    try:
        with torch.enable_grad():
            pruner = tp.pruner.MetaPruner(
                model,
                example_inputs=example,
                importance=tp.importance.GroupTaylorImportance(),
                global_pruning=False,
                pruning_ratio=0.0,
                pruning_ratio_dict=ratio_dict,
                ignored_layers=[model.lm_head, model.model.embed_tokens],
                num_heads=num_heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=head_ratio,
                round_to=ROUND_TO,
                forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            )
            for group in pruner.step(interactive=True):
                group.prune()
        del pruner
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(attn_impl)

    # Update attributes and config as the example does (hidden size is untouched here).
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_heads = attn.q_proj.out_features // attn.head_dim
        attn.num_key_value_heads = attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = attn.num_heads // attn.num_key_value_heads
        mlp.intermediate_size = mlp.gate_proj.out_features
    first = _layers(model)[0]
    cfg.num_attention_heads = first.self_attn.num_heads
    cfg.num_key_value_heads = first.self_attn.num_key_value_heads
    cfg.intermediate_size = first.mlp.intermediate_size
    if any(
        (layer.self_attn.num_heads, layer.mlp.intermediate_size) != (cfg.num_attention_heads, cfg.intermediate_size)
        for layer in _layers(model)
    ):
        log.warning("torch-pruning left layers of different widths; the config describes layer 0 only")
    return model


def describe_settings() -> str:
    """One line for a benchmark table."""
    return (
        f"torch-pruning {version('torch-pruning')} MetaPruner + GroupTaylorImportance, per-layer (local), "
        "prune_num_heads=True, prune_head_dims=False, round_to=4, lm_head and embeddings ignored (hidden size kept); "
        "GQA: equal numbers of query heads removed per KV group (never KV heads), MLP takes the rest of the ratio"
    )
