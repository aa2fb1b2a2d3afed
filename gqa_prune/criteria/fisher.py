"""``fisher``: per unit, the sum over calibration samples of the squared first-order loss change of
removing the unit (the empirical Fisher of its mask; LLM-Pruner's second-order variant, vector-wise).

The first-order change of removing a unit on one sample is minus the mask gradient, read from the
activations and activation gradients at the unit's output columns in the same backward as Taylor.
"""

from __future__ import annotations

from ..units import WIDTH_KINDS
from .base import PassResults, UnitCriterion


class Fisher(UnitCriterion):
    name = "fisher"
    description = "empirical Fisher of each unit's mask: sum over samples of its squared first-order loss change"
    backward = True

    def unit_scores(self, results: PassResults):
        fisher = results.mask_gradients.fisher()
        return {kind.name: fisher[kind.name] for kind in WIDTH_KINDS}
