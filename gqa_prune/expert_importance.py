"""The importance stage of a mixture-of-experts model: one forward-only pass over the calibration blocks
records, per expert of every MoE layer, the statistics every expert criterion folds (``criteria.experts``),
and per GQA group of every attention layer the norm of what it writes through o_proj.

Each expert's output on the tokens routed to it is recomputed by calling the layer's own experts module with
that expert alone at gate 1, so the norm is exactly what the model's fused kernel computes before gating,
in every family (gpt-oss's clamped GLU and biases included). It costs one more expert forward per routed token.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .blocks import check_blocks
from .criteria.experts import CHANNEL_STAT, EXPERT_STATS, GROUP_STAT
from .errors import GqaPruneError
from .expert_scores import ExpertScores
from .moe import ExpertGeometry, attention_block, expert_geometry_of, moe_family_for
from .passes import frozen, mean_loss
from .settings import IMPORTANCE_BATCH_SIZE

logger = logging.getLogger(__name__)


class ExpertStatsCollector:
    """Forward hooks on every layer's experts module, accumulating the four statistics per expert and the
    channel scores, and on every attention's o_proj, accumulating each GQA group's output norm."""

    def __init__(self, model: nn.Module, geometry: ExpertGeometry):
        family = moe_family_for(model.config)
        self.layout = family.layout
        self.stats = {
            name: [torch.zeros(count, dtype=torch.float64) for count in geometry.experts] for name in EXPERT_STATS
        }
        self.stats[CHANNEL_STAT] = [
            torch.zeros((count, width) if count else (0,), dtype=torch.float64)
            for count, width in zip(geometry.experts, geometry.widths)
        ]
        self.stats[GROUP_STAT] = [torch.zeros(groups, dtype=torch.float64) for groups in geometry.kv_groups]
        self.handles = []
        for index, layer in enumerate(family.decoder_layers(model)):
            block = family.sparse_block(layer)
            if block is not None:
                self.handles.append(block.experts.register_forward_hook(self._hook(index), with_kwargs=True))
            attention = attention_block(layer)
            if attention is not None:
                width = geometry.heads_per_group * geometry.head_dim
                self.handles.append(attention.o_proj.register_forward_pre_hook(self._group_hook(index, width)))

    def _group_hook(self, layer: int, width: int):
        """What each group's query heads write through o_proj (bias excluded), normed per token and summed."""

        def record(o_proj: nn.Linear, args) -> None:
            heads = args[0].reshape(-1, o_proj.in_features)
            sums = self.stats[GROUP_STAT][layer]
            for group in range(len(sums)):
                columns = slice(group * width, (group + 1) * width)
                written = heads[:, columns] @ o_proj.weight[:, columns].T
                sums[group] += written.double().norm(dim=-1).sum().cpu()

        return record

    def _hook(self, layer: int):
        def record(experts: nn.Module, args, kwargs, output) -> None:
            hidden, indices, gates = (*args, *kwargs.values())[:3]
            gates = gates.float()
            shares = gates / gates.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            stats = {name: self.stats[name][layer] for name in (*EXPERT_STATS, CHANNEL_STAT)}
            for expert in torch.unique(indices).tolist():
                tokens, slots = torch.where(indices == expert)
                alone = torch.full((len(tokens), 1), expert, dtype=indices.dtype, device=indices.device)
                unit_gate = torch.ones((len(tokens), 1), dtype=gates.dtype, device=gates.device)
                output_alone = experts.forward(hidden[tokens], alone, unit_gate.to(hidden.dtype))
                norms = output_alone.double().norm(dim=-1).cpu()
                gate = shares[tokens, slots].double().cpu()
                stats["count"][expert] += len(tokens)
                stats["gate_sum"][expert] += gate.sum()
                stats["norm_sum"][expert] += norms.sum()
                stats["gate_norm_sum"][expert] += (gate * norms).sum()
                activation = self.layout.activation(experts, expert, hidden[tokens]).double()
                column_norms = self.layout.down_columns(experts, expert).double().norm(dim=0)
                stats[CHANNEL_STAT][expert] += (
                    gate.to(activation.device) @ activation.abs()
                ).cpu() * column_norms.cpu()

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def score_experts(model: nn.Module, blocks: torch.Tensor, batch_size: int = IMPORTANCE_BATCH_SIZE) -> ExpertScores:
    """Record the expert statistics of ``model`` on calibration ``blocks`` [n, seq_len] (forward only)."""
    if batch_size < 1:
        raise GqaPruneError(f"batch_size must be >= 1, got {batch_size}")
    check_blocks(model, blocks, min_tokens=2, purpose="a next-token loss")
    geometry = expert_geometry_of(model)
    device = next(model.parameters()).device
    with frozen(model):
        collector = ExpertStatsCollector(model, geometry)
        try:
            loss = mean_loss(model, list(blocks.split(batch_size)), device, desc="expert statistics forward")
        finally:
            collector.remove()
    scores = ExpertScores(
        geometry=geometry,
        stats=collector.stats,
        calibration_loss=loss,
        info={
            "blocks": int(blocks.shape[0]),
            "block_len": int(blocks.shape[1]),
            "batch_size": batch_size,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
        },
    )
    scores.check("importance")
    never = sum(int((stats == 0).sum()) for stats in scores.stats["count"])
    logger.info("expert statistics: %d MoE layers, %d experts never routed to", len(geometry.moe_layers), never)
    return scores
