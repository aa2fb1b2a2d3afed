"""``taylor``: first-order Taylor importance |w * dL/dw| summed over a unit's weights.

The gradients of every layer come from ONE backward per calibration batch: a post-accumulate hook folds
each projection's |w * g| into its units and frees the gradient at once.
"""

from __future__ import annotations

from .base import PassResults, UnitCriterion


class Taylor(UnitCriterion):
    name = "taylor"
    description = "first-order Taylor |w·dL/dw| (one backward per batch)"
    backward = True

    def unit_scores(self, results: PassResults):
        return results.taylor.units
