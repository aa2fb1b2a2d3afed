"""``mlp_sublayer``: a layer's whole MLP block and the norm in front of it; the residual passes through."""

from __future__ import annotations

from .base import StructuralKind


class MlpSublayer(StructuralKind):
    name = "mlp_sublayer"
    scopes = ("mlp",)
    description = "MLP sublayer (gate/up/down and its norm)"


MLP_SUBLAYER = MlpSublayer()
