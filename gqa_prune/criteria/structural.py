"""Structural criteria: how much a layer or sublayer matters.

``block_influence`` (1 - cos between the residual stream before and after it, ShortGPT; for sublayers around
the attention and around the MLP) and ``activation`` (mean norm of what it adds; a layer's output norm) come
free from the shared passes. ``removal`` measures the calibration-loss increase when each one in turn is
bypassed: one extra forward over the calibration blocks per candidate (3 per layer: layer, attention, MLP).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..passes import mean_loss, removal_masks, unit_masks
from ..units import STRUCTURAL_KINDS
from .base import PassResults, StructuralCriterion


class BlockInfluence(StructuralCriterion):
    name = "block_influence"
    description = "1 - cos(residual before, after) per layer and sublayer"

    def structural_scores(self, results: PassResults, batches, device, base_loss):
        return results.structural_stats.scores()["block_influence"]


class OutputActivation(StructuralCriterion):
    name = "activation"
    description = "mean norm of a layer's output / of what a sublayer adds"

    def structural_scores(self, results: PassResults, batches, device, base_loss):
        return results.structural_stats.scores()["activation"]


class Removal(StructuralCriterion):
    name = "removal"
    description = "loss increase when bypassed (one forward per layer and sublayer)"
    extra_forwards = True

    def structural_scores(self, results: PassResults, batches, device, base_loss):
        geometry, model, adapter = results.geometry, results.model, results.adapter
        scores = {kind.name: [0.0] * geometry.num_layers for kind in STRUCTURAL_KINDS}
        candidates = [
            (kind, i) for i in range(geometry.num_layers) for kind in STRUCTURAL_KINDS if kind.count(geometry, i)
        ]
        for kind, index in tqdm(candidates, desc="removal", unit="candidate"):
            masks = removal_masks(geometry, {index: {kind.name: [0]}})
            with unit_masks(model, adapter, geometry, masks):
                scores[kind.name][index] = mean_loss(model, batches, device) - base_loss
        return scores


def measured_loss(results: PassResults, batches, device, removed) -> float:
    """Calibration loss with the given units removed by masks (layer -> kind -> units)."""
    masks = removal_masks(results.geometry, removed)
    context = unit_masks(results.model, results.adapter, results.geometry, masks) if masks else contextlib.nullcontext()
    with context, torch.no_grad():
        return mean_loss(results.model, batches, device)
