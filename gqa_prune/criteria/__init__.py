"""Registered criteria: unit criteria score GQA groups and MLP channels, structural ones layers and sublayers.

A new criterion is one module with a ``UnitCriterion`` or ``StructuralCriterion`` subclass and a line here.
"""

from __future__ import annotations

from .activation import Activation
from .base import PassResults, StructuralCriterion, UnitCriterion
from .fisher import Fisher
from .magnitude import Magnitude
from .obs import Obs
from .random_scores import Random
from .structural import BlockInfluence, OutputActivation, Removal, measured_loss
from .taylor import Taylor

UNIT_CRITERIA: dict[str, UnitCriterion] = {
    c.name: c for c in (Taylor(), Fisher(), Obs(), Magnitude(), Activation(), Random())
}
STRUCTURAL_CRITERIA: dict[str, StructuralCriterion] = {
    c.name: c for c in (BlockInfluence(), OutputActivation(), Removal())
}

__all__ = [
    "UNIT_CRITERIA",
    "STRUCTURAL_CRITERIA",
    "PassResults",
    "UnitCriterion",
    "StructuralCriterion",
    "measured_loss",
]
