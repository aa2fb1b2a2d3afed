"""What a criterion is: the passes it needs, and how it folds what the collectors saw into scores.

Unit criteria score the units of width kinds (GQA groups, MLP channels; higher = keep). Structural
criteria score sublayers and layers (higher = more important). ``importance.score`` runs the passes the
chosen criteria ask for once and hands each the same ``PassResults``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..arch import FamilyAdapter, Geometry
from ..passes import InputNormCollector, MaskGradientCollector, StructuralStatsCollector, TaylorCollector


@dataclass
class PassResults:
    """The model and what the collectors of one set of calibration passes gathered."""

    model: nn.Module
    adapter: FamilyAdapter
    geometry: Geometry
    seed: int
    batches: list = field(default_factory=list)  # the calibration batches the passes ran over
    device: torch.device | None = None
    taylor: TaylorCollector | None = None
    input_norms: InputNormCollector | None = None
    mask_gradients: MaskGradientCollector | None = None
    structural_stats: StructuralStatsCollector | None = None
    extra: dict = field(default_factory=dict)


class UnitCriterion(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    backward: ClassVar[bool] = False  # needs one forward+backward per batch (else forward only)
    input_norms: ClassVar[bool] = False  # needs the calibration input norm of every projection column

    @abstractmethod
    def unit_scores(self, results: PassResults) -> dict[str, list[torch.Tensor]]:
        """Width kind -> per-layer keep-scores."""


class StructuralCriterion(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    extra_forwards: ClassVar[bool] = False  # costs forwards beyond the shared passes

    @abstractmethod
    def structural_scores(self, results: PassResults, batches, device, base_loss: float) -> dict[str, list[float]]:
        """Structural kind -> per-layer importance."""


def fold_weights(results: PassResults, weight_salience, bias_salience=None) -> dict[str, list[torch.Tensor]]:
    """Scores that need no gradients: fold each projection's weight-shaped salience into its units."""
    from ..reduce import bias_to_units, weight_to_units
    from ..units import WIDTH_KINDS, width_kind

    geometry, adapter = results.geometry, results.adapter
    units = {
        kind.name: [torch.zeros(kind.count(geometry, i)) for i in range(geometry.num_layers)] for kind in WIDTH_KINDS
    }
    for index, layer in enumerate(adapter.decoder_layers(results.model)):
        for role, projection in adapter.projections(layer):
            width = geometry.indices_per_unit(role)
            target = units[width_kind(role.unit).name][index]
            target.add_(weight_to_units(weight_salience(role, projection, index), role, width).cpu())
            if bias_salience is not None and role.axis == "out" and projection.bias is not None:
                target.add_(bias_to_units(bias_salience(projection.bias), width).cpu())
    return units
