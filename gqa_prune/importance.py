"""The importance stage: run the calibration passes the chosen criteria need, once, and return ``Scores``.

Unit criteria (``criteria.UNIT_CRITERIA``): taylor, fisher, magnitude, activation, random. Structural
criteria (``criteria.STRUCTURAL_CRITERIA``): block_influence and activation (free from the same passes),
removal (one extra forward per layer and sublayer). Then, per unit kind, a loss curve is measured on
calibration data (``loss_curves``): what removing more and more of that kind actually costs. The hybrid
plan compares kinds in that one currency, nats of calibration loss per parameter removed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .arch import Geometry, adapter_for, geometry_of
from .blocks import check_blocks
from .criteria import STRUCTURAL_CRITERIA, UNIT_CRITERIA, PassResults, measured_loss
from .errors import GqaPruneError
from .passes import (
    InputNormCollector,
    MaskGradientCollector,
    StructuralStatsCollector,
    TaylorCollector,
    forward_backward,
    frozen,
    mean_loss,
)
from .planning import CURVE_FRACTIONS, HYBRID_KINDS, PlanSettings, compose
from .scores import LossCurve, Scores
from .settings import CURVE_TOKENS, IMPORTANCE_BATCH_SIZE
from .units import KINDS

logger = logging.getLogger(__name__)

DEFAULT_LAYER_CRITERIA = ("block_influence", "activation")
CURVE_CEILING = 3.0  # nats: a kind that costs this much more is never worth more removal


def _check_inputs(model: nn.Module, blocks: torch.Tensor, criterion: str, layer_criteria, batch_size: int) -> None:
    if criterion not in UNIT_CRITERIA:
        raise GqaPruneError(f"unit criterion {criterion!r} is not one of {', '.join(UNIT_CRITERIA)}")
    unknown = [name for name in layer_criteria if name not in STRUCTURAL_CRITERIA]
    if unknown:
        raise GqaPruneError(f"layer criterion {unknown[0]!r} is not one of {', '.join(STRUCTURAL_CRITERIA)}")
    if batch_size < 1:
        raise GqaPruneError(f"batch_size must be >= 1, got {batch_size}")
    check_blocks(model, blocks, min_tokens=2, purpose="a next-token loss")


def score(
    model: nn.Module,
    blocks: torch.Tensor,
    criterion: str,
    layer_criteria: Sequence[str] = DEFAULT_LAYER_CRITERIA,
    batch_size: int = IMPORTANCE_BATCH_SIZE,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    curves: bool = True,
    curve_blocks: int | None = None,
    channel_multiple: int = 128,
) -> Scores:
    """Score every unit, sublayer and layer of ``model`` on calibration ``blocks`` [n, seq_len].

    ``curves`` also measures each kind's loss curve on the first ``curve_blocks`` blocks (default: as many
    as hold ``CURVE_TOKENS`` tokens), with MLP widths in multiples of ``channel_multiple`` as plans keep them.
    """
    _check_inputs(model, blocks, criterion, layer_criteria, batch_size)
    if "block_influence" not in layer_criteria:
        layer_criteria = ("block_influence", *layer_criteria)  # free, and what plans order layers by by default
    unit_criterion = UNIT_CRITERIA[criterion]
    adapter, geometry = adapter_for(model.config), geometry_of(model)
    device = next(model.parameters()).device
    batches = list(blocks.split(batch_size))
    results = PassResults(model, adapter, geometry, seed, batches, device)
    with frozen(model):
        results.structural_stats = StructuralStatsCollector(model, adapter)
        collectors = [results.structural_stats]
        if unit_criterion.input_norms:
            results.input_norms = InputNormCollector(model, adapter)
            collectors.append(results.input_norms)
        if criterion == "taylor":
            results.taylor = TaylorCollector(model, adapter, geometry)
            collectors.append(results.taylor)
        if criterion == "fisher":
            results.mask_gradients = MaskGradientCollector(model, adapter, geometry)
            collectors.append(results.mask_gradients)
        try:
            if unit_criterion.backward:
                loss = forward_backward(
                    model,
                    batches,
                    device,
                    gradient_checkpointing,
                    results.mask_gradients,
                    desc=f"{criterion} forward+backward",
                )
            else:
                loss = mean_loss(model, batches, device, desc=f"{criterion} forward")
        finally:
            for collector in collectors:
                collector.remove()
        scores = Scores(
            criterion=criterion,
            geometry=geometry,
            units=unit_criterion.unit_scores(results),
            structural={
                name: STRUCTURAL_CRITERIA[name].structural_scores(results, batches, device, loss)
                for name in layer_criteria
            },
            calibration_loss=loss,
            info={
                "blocks": int(blocks.shape[0]),
                "block_len": int(blocks.shape[1]),
                "batch_size": batch_size,
                "seed": seed,
                "forward_backward_passes": len(batches) if unit_criterion.backward else 0,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
        )
        scores.check_finite("importance")
        if curves:
            if curve_blocks is None:
                curve_blocks = -(-CURVE_TOKENS // int(blocks.shape[1]))
            measure = list(blocks[:curve_blocks].split(batch_size)) if curve_blocks < len(blocks) else batches
            base = loss if measure is batches else mean_loss(model, measure, device)
            scores.curves = loss_curves(results, scores, measure, device, base, channel_multiple)
            scores.info["curve_blocks"] = int(sum(len(batch) for batch in measure))
    return scores


def loss_curves(
    results: PassResults, scores: Scores, batches, device, base_loss: float, channel_multiple: int
) -> dict[str, LossCurve]:
    """Per kind, the measured calibration-loss increase of removing 5, 10, 20, 30, 40 % of all attention+MLP
    parameters from that kind alone, chosen exactly as a plan would (least important layers and sublayers
    first; GQA groups and MLP channels by the width allocation and the unit scores). One forward each;
    a kind stops once it cannot give more or its loss has risen by more than ``CURVE_CEILING`` nats."""
    geometry = results.geometry
    settings = PlanSettings(ratio=0.0, mode="hybrid", channel_multiple=channel_multiple)
    total = geometry.unit_params()
    curves = {}
    for kind in HYBRID_KINDS:
        points: list[tuple[int, float]] = []
        for fraction in CURVE_FRACTIONS:
            try:
                layers = compose(scores, settings, {kind: fraction * total})
            except GqaPruneError:
                break
            removed = {layer.layer: layer.removed_units(geometry) for layer in layers}
            removed = {index: units for index, units in removed.items() if units}
            params = sum(_projection_params(geometry, index, units) for index, units in removed.items())
            if not params or (points and params <= points[-1][0]):
                continue
            increase = measured_loss(results, batches, device, removed) - base_loss
            points.append((params, increase))
            logger.info("loss curve %s: %d parameters removed, loss +%.4f", kind, params, increase)
            if increase > CURVE_CEILING:
                break
        curves[kind] = LossCurve(tuple(points))
    return curves


def _projection_params(geometry: Geometry, index: int, units: dict[str, list[int]]) -> int:
    """Attention+MLP projection parameters a layer loses (what ratios count)."""
    if "layer" in units:
        return geometry.attention_params(index) + geometry.mlp_params(index)
    params = 0
    for kind_name, removed in units.items():
        if kind_name == "attn_sublayer":
            params += geometry.attention_params(index)
        elif kind_name == "mlp_sublayer":
            params += geometry.mlp_params(index)
        else:
            params += len(removed) * KINDS[kind_name].params_per_unit(geometry, index)
    return params
