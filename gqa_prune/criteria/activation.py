"""``activation``: Wanda-style |w| * ||x||, with ||x|| the L2 norm of each input feature over calibration tokens."""

from __future__ import annotations

from ..reduce import activation_salience
from .base import PassResults, UnitCriterion, fold_weights


class Activation(UnitCriterion):
    name = "activation"
    description = "Wanda-style |w|·||x||"
    input_norms = True

    def unit_scores(self, results: PassResults):
        norms = results.input_norms
        return fold_weights(
            results, lambda role, projection, layer: activation_salience(projection.weight, norms.norm(layer, role))
        )
