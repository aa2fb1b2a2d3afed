"""The importance stage of a mixture-of-experts model: one forward-only pass over the calibration blocks
records, per expert of every MoE layer, the statistics every expert criterion folds (``criteria.experts``),
per GQA group of every attention layer the norm of what it writes through o_proj, and per channel of a shared
MLP its Wanda-style score. Then, per MoE layer, a
loss curve (``expert_loss_curves``): the measured calibration-loss increase of removing 25, 50, 75 % of that
layer's experts alone (lowest REAP first), likewise per attention layer for its GQA groups and per shared MLP
for its channels (``width_loss_curves``), of removing each decoder layer whole (``layer_loss_curves``) and each
attention block and MoE block alone (``sublayer_loss_curves``), which `--experts per-layer` plans price layers and
kinds by.

Each expert's output on the tokens routed to it is recomputed by calling the layer's own experts module with
that expert alone at gate 1, so the norm is exactly what the model's fused kernel computes before gating,
in every family (gpt-oss's clamped GLU and biases included). It costs one more expert forward per routed token.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import check_blocks
from .choices import EXPERT_GRADIENT_CRITERIA
from .criteria.experts import (
    CHANNEL_STAT,
    DEFAULT_EXPERT_CRITERION,
    EXPERT_CRITERIA,
    EXPERT_STATS,
    FISHER_STAT,
    GROUP_STAT,
    SHARED_STAT,
    TAYLOR_STAT,
)
from .errors import GqaPruneError
from .expert_plan import EXPERT_CURVE_FRACTIONS, ExpertPlan
from .expert_scores import LAYER_KIND, ExpertScores
from .expert_surgery import masked_experts
from .importance import CURVE_CEILING
from .moe import MOE_FAMILIES, SUBLAYERS, ExpertGeometry, attention_block, expert_geometry_of, moe_family_for
from .passes import forward_backward, frozen, mean_loss
from .planning import top_units
from .scores import LossCurve
from .settings import CURVE_TOKENS, IMPORTANCE_BATCH_SIZE
from .surgery import mixes_attention_types
from .units.expert import EXPERT

logger = logging.getLogger(__name__)


class ExpertStatsCollector:
    """Forward hooks on every layer's experts module, accumulating the four statistics per expert and the
    channel scores, and on every attention's o_proj, accumulating each GQA group's output norm. With
    ``gradients`` (passes with a backward) also each expert's Taylor salience, from post-accumulate-grad hooks
    on the fused expert tensors, and its Fisher score, from the gradients of the gates it was routed with."""

    def __init__(self, model: nn.Module, geometry: ExpertGeometry, gradients: bool = False):
        family = moe_family_for(model.config)
        self.layout = family.layout
        self.gradients = gradients
        self.samples, self._batch_size = 0, 1
        names = (*EXPERT_STATS, TAYLOR_STAT, FISHER_STAT) if gradients else EXPERT_STATS
        self.stats = {name: [torch.zeros(count, dtype=torch.float64) for count in geometry.experts] for name in names}
        self.stats[CHANNEL_STAT] = [
            torch.zeros((count, width) if count else (0,), dtype=torch.float64)
            for count, width in zip(geometry.experts, geometry.widths)
        ]
        self.stats[GROUP_STAT] = [torch.zeros(groups, dtype=torch.float64) for groups in geometry.kv_groups]
        self.stats[SHARED_STAT] = [torch.zeros(width, dtype=torch.float64) for width in geometry.shared_widths]
        self.handles = []
        for index, layer in enumerate(family.decoder_layers(model)):
            block = family.sparse_block(layer)
            if block is not None:
                self.handles.append(block.experts.register_forward_hook(self._hook(index), with_kwargs=True))
                if gradients:
                    for tensor in block.experts.parameters(recurse=False):
                        self._watch(tensor, self.stats[TAYLOR_STAT][index])
            attention = attention_block(layer)
            if attention is not None:
                width = geometry.heads_per_group * geometry.head_dim
                self.handles.append(attention.o_proj.register_forward_pre_hook(self._group_hook(index, width)))
            shared = None if family.shared_mlp is None else family.shared_mlp.module(layer)
            if shared is not None:
                output = family.shared_mlp.output(shared)
                self.handles.append(output.register_forward_pre_hook(self._shared_hook(index)))

    def start_batch(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def _watch(self, parameter: nn.Parameter, target: torch.Tensor) -> None:
        """Fold |w * g| of a fused expert tensor (experts first) into ``target`` as its gradient arrives."""

        def hook(param: torch.Tensor) -> None:
            target.add_((param.detach() * param.grad).abs().double().reshape(len(target), -1).sum(dim=1).cpu())
            param.grad = None

        parameter.requires_grad_(True)
        self.handles.append(parameter.register_post_accumulate_grad_hook(hook))

    def _watch_gates(self, layer: int, indices: torch.Tensor, gates: torch.Tensor) -> None:
        """Per sample and expert, sum over its routed tokens of gate x dL/dgate: minus the first-order loss change
        of removing the expert on that sample (the batch loss is a mean, hence the batch size); squares summed."""
        if not gates.requires_grad:
            return
        values, routed = gates.detach(), indices.detach()
        experts, batch_size = len(self.stats[FISHER_STAT][layer]), self._batch_size

        def hook(grad: torch.Tensor) -> None:
            products = (values * grad).double().reshape(batch_size, -1)  # samples x (tokens x slots)
            slots = routed.reshape(batch_size, -1)
            per_sample = torch.zeros(batch_size, experts, dtype=torch.float64, device=products.device)
            per_sample.scatter_add_(1, slots, products)
            self.stats[FISHER_STAT][layer] += (per_sample * batch_size).pow(2).sum(dim=0).cpu()

        gates.register_hook(hook)

    def _shared_hook(self, layer: int):
        """|activation| of each shared-MLP channel summed over tokens, times its output column's norm."""

        def record(output: nn.Linear, args) -> None:
            activation = args[0].reshape(-1, output.in_features).double().abs().sum(dim=0)
            self.stats[SHARED_STAT][layer] += (activation * output.weight.double().norm(dim=0)).cpu()

        return record

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
            if self.gradients:
                self._watch_gates(layer, indices, gates)
            with torch.no_grad():
                self._record(experts, layer, hidden, indices, gates)

        return record

    def _record(self, experts: nn.Module, layer: int, hidden, indices, gates) -> None:
        """The forward-only statistics of one experts call (see the module doc)."""
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
            stats[CHANNEL_STAT][expert] += (gate.to(activation.device) @ activation.abs()).cpu() * column_norms.cpu()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def needs_gradients(criterion: str | None) -> bool:
    """Whether ``importance --criterion`` on a mixture of experts asks for the gradient statistics (taylor,
    fisher); None: forward-only. Other (dense) criteria are refused in one line."""
    if criterion is not None and criterion not in EXPERT_GRADIENT_CRITERIA:
        raise GqaPruneError(
            f"--criterion {criterion}: a mixture of experts is scored by its expert statistics; --criterion "
            f"may be {' or '.join(EXPERT_GRADIENT_CRITERIA)} there (adds the experts' gradient scores)"
        )
    return criterion is not None


def score_experts(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = IMPORTANCE_BATCH_SIZE,
    curves: bool = True,
    curve_blocks: int | None = None,
    gradients: bool = False,
) -> ExpertScores:
    """Record the expert statistics of ``model`` on calibration ``blocks`` [n, seq_len] (forward only; with
    ``gradients`` one forward+backward per batch, adding the experts' Taylor and Fisher scores) and, with
    ``curves``, every MoE layer's loss curve on the first ``curve_blocks`` blocks (default: as many as hold
    ``CURVE_TOKENS`` tokens)."""
    if batch_size < 1:
        raise GqaPruneError(f"batch_size must be >= 1, got {batch_size}")
    check_blocks(model, blocks, min_tokens=2, purpose="a next-token loss")
    geometry = expert_geometry_of(model)
    device = next(model.parameters()).device
    batches = list(blocks.split(batch_size))
    with frozen(model):
        collector = ExpertStatsCollector(model, geometry, gradients=gradients)
        try:
            if gradients:
                loss = forward_backward(model, batches, device, mask_gradients=collector, desc="expert gradients")
            else:
                loss = mean_loss(model, batches, device, desc="expert statistics forward")
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
            "gradients": gradients,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
        },
    )
    scores.check("importance")
    never = sum(int((stats == 0).sum()) for stats in scores.stats["count"])
    logger.info("expert statistics: %d MoE layers, %d experts never routed to", len(geometry.moe_layers), never)
    if curves:
        if curve_blocks is None:
            curve_blocks = -(-CURVE_TOKENS // int(blocks.shape[1]))
        measure = list(blocks[:curve_blocks].split(batch_size)) if curve_blocks < len(blocks) else batches
        with frozen(model):
            base = loss if measure is batches else mean_loss(model, measure, device)
            scores.curves = expert_loss_curves(model, scores, measure, device, base)
            scores.width_curves = width_loss_curves(model, scores, measure, device, base)
            scores.width_curves[CHANNEL_STAT] = expert_channel_loss_curves(model, scores, measure, device, base)
            scores.width_curves[LAYER_KIND] = layer_loss_curves(model, scores, measure, device, base)
            scores.width_curves.update(sublayer_loss_curves(model, scores, measure, device, base))
        scores.info["curve_blocks"] = int(sum(len(batch) for batch in measure))
    return scores


def expert_loss_curves(
    model: nn.Module, scores: ExpertScores, batches, device, base_loss: float
) -> dict[int, LossCurve]:
    """Per MoE layer, the measured calibration-loss increase of removing ``EXPERT_CURVE_FRACTIONS`` of its
    experts alone (lowest under the default criterion first, masked out of routing; every layer keeps top-k):
    (parameters removed, nats). One forward each; a layer stops once its loss rose by ``CURVE_CEILING``."""
    geometry, family = scores.geometry, moe_family_for(model.config)
    layers = family.decoder_layers(model)
    criterion = EXPERT_CRITERIA[DEFAULT_EXPERT_CRITERION]
    curves = {}
    for layer in tqdm(geometry.moe_layers, desc="expert loss curves", unit="layer", leave=False):
        experts = geometry.experts[layer]
        order = criterion.scores(scores.layer_stats(layer), layer, 0)
        points: list[tuple[int, float]] = []
        for removed in _removal_counts(experts, geometry.top_k):
            kept = top_units(order, experts - removed)
            handle = EXPERT.mask(family.sparse_block(layers[layer]), family, model.config, kept)
            try:
                increase = mean_loss(model, batches, device) - base_loss
            finally:
                handle.remove()
            points.append((removed * geometry.params_per_expert(layer), increase))
            logger.info("expert loss curve, layer %d: %d experts removed, loss +%.4f", layer, removed, increase)
            if increase > CURVE_CEILING:
                break
        curves[layer] = LossCurve(tuple(points))
    return curves


def expert_channel_loss_curves(
    model: nn.Module, scores: ExpertScores, batches, device, base_loss: float
) -> dict[int, LossCurve]:
    """Per MoE layer, the measured calibration-loss increase of removing ``EXPERT_CURVE_FRACTIONS`` of the
    intermediate channels of every one of its experts (each expert its lowest channel statistics, at least one
    kept), masked as an expert plan's reference masks them: (parameters removed, nats). One forward each; a
    layer stops once its loss rose by ``CURVE_CEILING``."""
    geometry = scores.geometry
    curves = {}
    for layer in tqdm(geometry.moe_layers, desc="expert channel loss curves", unit="layer", leave=False):
        width, experts = geometry.widths[layer], geometry.experts[layer]
        points: list[tuple[int, float]] = []
        for removed in _removal_counts(width, 1):
            channels = [
                tuple(tuple(range(w)) for _ in range(count)) for w, count in zip(geometry.widths, geometry.experts)
            ]
            channels[layer] = tuple(
                top_units(scores.stats[CHANNEL_STAT][layer][expert], width - removed) for expert in range(experts)
            )
            increase = _removal_loss(model, scores, batches, device, base_loss, channels=tuple(channels))
            points.append((removed * experts * geometry.params_per_channel, increase))
            logger.info(
                "expert channel loss curve, layer %d: %d of %d removed, loss +%.4f", layer, removed, width, increase
            )
            if increase > CURVE_CEILING:
                break
        curves[layer] = LossCurve(tuple(points))
    return curves


def _removal_counts(units: int, floor: int) -> list[int]:
    """How many of ``units`` a loss curve removes: ``EXPERT_CURVE_FRACTIONS`` of them, keeping ``floor``."""
    return sorted({min(round(f * units), units - floor) for f in EXPERT_CURVE_FRACTIONS} - {0})


def width_loss_curves(
    model: nn.Module, scores: ExpertScores, batches, device, base_loss: float
) -> dict[str, dict[int, LossCurve]]:
    """Per attention layer, the measured calibration-loss increase of removing ``EXPERT_CURVE_FRACTIONS`` of its
    GQA groups alone (lowest group statistic first, at least one kept), and per shared MLP of its channels
    (lowest shared statistic first): (parameters removed, nats), masked as an expert plan's reference masks
    them. One forward each; a layer stops once its loss rose by ``CURVE_CEILING``. Families whose q/k norms
    span all heads get no group curves (their groups are not removable)."""
    geometry = scores.geometry
    family = MOE_FAMILIES[geometry.family]
    kinds = {}
    if geometry.kv_groups and not family.heads_normed_together:
        kinds[GROUP_STAT] = ("groups", geometry.kv_groups, geometry.params_per_group)
    if geometry.shared_widths and family.shared_mlp is not None:
        kinds[SHARED_STAT] = ("shared_channels", geometry.shared_widths, geometry.params_per_shared_channel)
    curves: dict[str, dict[int, LossCurve]] = {}
    for kind, (field_name, sizes, unit_params) in kinds.items():
        whole = tuple(tuple(range(size)) for size in sizes)
        curves[kind] = {}
        for layer in tqdm([i for i, size in enumerate(sizes) if size > 1], desc=f"{kind} loss curves", leave=False):
            points: list[tuple[int, float]] = []
            for removed in _removal_counts(sizes[layer], 1):
                kept = list(whole)
                kept[layer] = top_units(scores.stats[kind][layer], sizes[layer] - removed)
                increase = _removal_loss(model, scores, batches, device, base_loss, **{field_name: tuple(kept)})
                points.append((removed * unit_params, increase))
                logger.info("%s loss curve, layer %d: %d removed, loss +%.4f", kind, layer, removed, increase)
                if increase > CURVE_CEILING:
                    break
            curves[kind][layer] = LossCurve(tuple(points))
    return curves


def layer_loss_curves(
    model: nn.Module, scores: ExpertScores, batches, device, base_loss: float
) -> dict[int, LossCurve]:
    """Per decoder layer (attention, state-space or MoE alike), the measured calibration-loss increase of removing
    it whole (it passes its input on, as an expert plan's reference removes it): one point, (its parameters,
    nats); one forward each."""
    geometry = scores.geometry
    curves = {}
    for layer in tqdm(range(geometry.num_layers), desc="layer loss curves", unit="layer", leave=False):
        increase = _removal_loss(model, scores, batches, device, base_loss, removed_layers=(layer,))
        logger.info("layer loss curve, layer %d removed: loss +%.4f", layer, increase)
        curves[layer] = LossCurve(((geometry.layer_params[layer], increase),))
    return curves


def sublayer_loss_curves(
    model: nn.Module, scores: ExpertScores, batches, device, base_loss: float
) -> dict[str, dict[int, LossCurve]]:
    """Per MoE layer, the measured calibration-loss increase of removing its MoE block (routed experts with any
    shared expert or shared MLP; ``"mlp"``), and per attention layer of removing its attention block, where the
    model's layers share one attention type (else single attention blocks cannot go): one point each, (the
    sublayer's parameters, nats), the block adding nothing as an expert plan's reference removes it."""
    geometry = scores.geometry
    candidates = [(layer, "mlp") for layer in geometry.moe_layers]
    if not mixes_attention_types(model.config):
        candidates += [
            (layer, "attention") for layer in range(geometry.num_layers) if geometry.sublayer_params[layer][0]
        ]
    curves: dict[str, dict[int, LossCurve]] = {name: {} for name in SUBLAYERS}
    for layer, name in tqdm(sorted(candidates), desc="sublayer loss curves", unit="sublayer", leave=False):
        increase = _removal_loss(model, scores, batches, device, base_loss, removed_sublayers=((layer, name),))
        logger.info("sublayer loss curve, layer %d without its %s block: loss +%.4f", layer, name, increase)
        curves[name][layer] = LossCurve(((geometry.sublayer_params[layer][SUBLAYERS.index(name)], increase),))
    return {name: per_layer for name, per_layer in curves.items() if per_layer}


def _removal_loss(model: nn.Module, scores: ExpertScores, batches, device, base_loss: float, **removed) -> float:
    """The calibration-loss increase of a probe expert plan that keeps every expert and removes only what
    ``removed`` names (ExpertPlan fields: kept groups, shared channels or expert channels, removed layers or
    sublayers), measured on the masked reference."""
    geometry = scores.geometry
    every_expert = tuple(tuple(range(count)) for count in geometry.experts)
    probe = ExpertPlan(
        geometry, 0.0, DEFAULT_EXPERT_CRITERION, every_expert, int(scores.info["parameters"]), allocation="per-layer",
        **removed,
    )  # fmt: skip
    with masked_experts(model, probe):
        return mean_loss(model, batches, device) - base_loss
