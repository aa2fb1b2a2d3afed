"""``mlp_channel``: one intermediate channel of a gated MLP (a gate_proj and up_proj row, a down_proj column)."""

from __future__ import annotations

from torch import nn

from ..arch import MLP_ROLES, Geometry
from .base import WidthKind


class MlpChannel(WidthKind):
    name = "mlp_channel"
    scopes = ("mlp",)
    geometry_field = "intermediate_sizes"
    roles = MLP_ROLES
    description = "MLP channel: a gate/up row and a down column"

    def params_per_unit(self, geometry: Geometry, layer: int) -> int:
        return geometry.params_per_channel

    def config_entries(self, geometry: Geometry, units: int) -> dict[str, int]:
        return {"intermediate_size": units}

    def sync_attributes(self, block: nn.Module, geometry: Geometry, units: int) -> None:
        if hasattr(block, "intermediate_size"):
            block.intermediate_size = units


MLP_CHANNEL = MlpChannel()
