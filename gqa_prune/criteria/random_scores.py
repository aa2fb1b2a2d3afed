"""``random``: seeded uniform scores, the baseline every criterion must beat."""

from __future__ import annotations

import torch

from ..units import WIDTH_KINDS
from .base import PassResults, UnitCriterion


class Random(UnitCriterion):
    name = "random"
    description = "seeded random baseline"

    def unit_scores(self, results: PassResults):
        generator = torch.Generator().manual_seed(results.seed)
        geometry = results.geometry
        return {
            kind.name: [torch.rand(kind.count(geometry, i), generator=generator) for i in range(geometry.num_layers)]
            for kind in WIDTH_KINDS
        }
