"""A real-weight mixture-of-experts test bed on a CPU: SmolLM2-135M with every MLP split into experts.

No MoE model can be downloaded here, so one is made from SmolLM2's own weights (MoEfication-style, with a
shared expert as DeepSeek-MoE and Qwen2-MoE have):

1. A shared expert per layer: the ``shared`` channels (of 1536) with the largest mean |silu(gate) * up| x
   down-column norm on calibration tokens -- always on, behind Qwen2-MoE's sigmoid gate (weight 0: 0.5, its
   down_proj doubled to make up for it).
2. Routed experts: the other channels are clustered into ``experts`` groups of equal size by balanced k-means on
   their co-activation (|silu(gate) * up| over calibration tokens, each channel's vector normalised), so
   channels that fire together land in one expert. Together the shared and routed experts hold exactly the
   dense MLP's weights.
3. A router per layer, fitted by ridge least squares on calibration activations: from the MLP's input it
   predicts the norm of each routed expert's output; a token goes to the ``top_k`` experts predicted largest.
4. Gates: the router (``norm_topk_prob``) softmaxes over the top-k and the expert outputs are multiplied by
   those gates. The router here is scaled by ``temperature`` (1e-3) and every routed expert's down_proj by
   ``top_k``, so the gates are within ~1 % of 1/top_k and a token's MLP output is the shared expert's plus the
   sum of its chosen experts' outputs: with all experts chosen, exactly the dense MLP. By construction the gates
   carry almost no information here (REAP on this test bed ranks experts by their mean output norm); on
   trained MoEs they do.

The result is a stock ``Qwen2MoeForCausalLM`` (30 layers, tied embeddings, no attention biases), deterministic
for a seed. Its WikiText-2 perplexity is worse than dense SmolLM2's because each token uses only ``shared +
top_k x routed width`` of the 1536 MLP channels; ``bench/experts.py`` prints both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

TEMPERATURE = 1e-3
RIDGE = 1e-2  # relative to the mean diagonal of the Gram matrix


def balanced_kmeans(features: torch.Tensor, clusters: int, seed: int, iterations: int = 10) -> list[list[int]]:
    """Rows of ``features`` [n, d] (unit norm) into ``clusters`` groups of n / clusters by cosine similarity;
    each round assigns the most confident (row, centroid) pairs first, up to every group's capacity."""
    rows = features.shape[0]
    capacity = rows // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(rows, generator=generator)[:clusters]].clone()
    assignment = torch.zeros(rows, dtype=torch.long)
    for _ in range(iterations):
        similarity = features @ centroids.T  # [rows, clusters]
        order = torch.argsort(similarity.flatten(), descending=True).tolist()
        taken, filled, placed = [False] * rows, [0] * clusters, 0
        for flat in order:
            row, cluster = divmod(flat, clusters)
            if taken[row] or filled[cluster] >= capacity:
                continue
            assignment[row], taken[row] = cluster, True
            filled[cluster] += 1
            placed += 1
            if placed == rows:
                break
        centroids = torch.stack([features[assignment == c].mean(0) for c in range(clusters)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return [sorted(torch.nonzero(assignment == c).flatten().tolist()) for c in range(clusters)]


def _mlp_inputs(model: LlamaForCausalLM, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the MLP's inputs (post-norm hidden states) on the calibration blocks, [tokens, hidden]."""
    inputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = [
        layer.mlp.register_forward_hook(lambda module, args, output, i=i: inputs[i].append(args[0].flatten(0, 1)))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for block in blocks.split(1):
            model(input_ids=block)
    for handle in handles:
        handle.remove()
    return [torch.cat(per_layer) for per_layer in inputs]


def build_testbed(
    dense: LlamaForCausalLM,
    blocks: torch.Tensor,
    experts: int = 16,
    top_k: int = 4,
    shared: int = 768,
    seed: int = 0,
    temperature: float = TEMPERATURE,
) -> Qwen2MoeForCausalLM:
    """SmolLM2 (or any Llama without biases) as a Qwen2-MoE: per layer a shared expert of the ``shared``
    channels that matter most on average, and ``experts`` routed experts of the other channels, top-``top_k``."""
    source = dense.config
    routed_width = source.intermediate_size - shared
    if shared < 1 or routed_width % experts:
        raise ValueError(f"{routed_width} routed MLP channels do not split into {experts} equal experts")
    config = Qwen2MoeConfig(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads, num_key_value_heads=source.num_key_value_heads,
        head_dim=source.head_dim, hidden_act=source.hidden_act, max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps, rope_parameters=source.rope_parameters,
        tie_word_embeddings=source.tie_word_embeddings, bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id, qkv_bias=False, use_sliding_window=False, decoder_sparse_step=1,
        mlp_only_layers=[], num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        moe_intermediate_size=routed_width // experts, shared_expert_intermediate_size=shared,
        intermediate_size=source.intermediate_size, router_aux_loss_coef=0.0,
    )  # fmt: skip
    moe = Qwen2MoeForCausalLM(config).eval()
    state = {name: tensor for name, tensor in dense.state_dict().items() if ".mlp." not in name}
    missing, _ = moe.load_state_dict(state, strict=False)
    assert all(".mlp." in name for name in missing), missing
    inputs = _mlp_inputs(dense, blocks)
    with torch.no_grad():
        for index, (layer, moe_layer) in enumerate(zip(dense.model.layers, moe.model.layers)):
            x = inputs[index].double()
            gate, up, down = (p.weight.double() for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
            activation = nn.functional.silu(x @ gate.T) * (x @ up.T)  # [tokens, width]
            importance = activation.abs().mean(0) * down.norm(dim=0)
            order = torch.argsort(importance, descending=True)
            common, rest = sorted(order[:shared].tolist()), sorted(order[shared:].tolist())
            features = activation[:, rest].abs().T
            features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
            groups = [[rest[i] for i in group] for group in balanced_kmeans(features, experts, seed)]
            # what each routed expert adds to the residual stream for each token: the router's regression target
            targets = torch.stack([(activation[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)
            gram = x.T @ x
            gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            router = torch.linalg.solve(gram, x.T @ targets).T  # [experts, hidden]
            block = moe_layer.mlp
            block.gate.weight.copy_(temperature * router)
            for e, channels in enumerate(groups):
                block.experts.gate_up_proj[e].copy_(torch.cat([gate[channels], up[channels]]))
                block.experts.down_proj[e].copy_(top_k * down[:, channels])
            block.shared_expert.gate_proj.weight.copy_(gate[common])
            block.shared_expert.up_proj.weight.copy_(up[common])
            block.shared_expert.down_proj.weight.copy_(2 * down[:, common])  # its sigmoid gate is 0.5 (weight 0)
            block.shared_expert_gate.weight.zero_()
    return moe
