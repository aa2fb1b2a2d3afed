"""``magnitude``: L1 norm of a unit's weights (biases included). No gradients, no calibration dependence."""

from __future__ import annotations

from .base import PassResults, UnitCriterion, fold_weights


class Magnitude(UnitCriterion):
    name = "magnitude"
    description = "L1 of the unit's weights"

    def unit_scores(self, results: PassResults):
        return fold_weights(
            results,
            lambda role, projection, layer: projection.weight.detach().float().abs(),
            bias_salience=lambda bias: bias.detach().float().abs(),
        )
