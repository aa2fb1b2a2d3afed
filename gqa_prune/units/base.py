"""The protocol every unit kind follows: how many units a layer has, what one costs in parameters, which
weights it owns, and how its removal is applied (physically, or as a masked reference) to a decoder layer.

Two families of kinds: *width* kinds (many units per layer, e.g. GQA groups, MLP channels) slice rows and
columns of projections; *structural* kinds (one unit per layer: an attention or MLP sublayer, a whole layer)
remove blocks. Every kind's masked reference zeroes exactly what its units add to the residual stream
(columns of o_proj / down_proj, plus their bias for a whole sublayer), so a physically pruned model must give
the same outputs as the masked dense one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..arch import FamilyAdapter, Geometry, ProjectionRole, Scope
from ..modeling_gqa_prune import skip_sublayer

SKIP_NAMES: dict[Scope, str] = {"attn": "attention", "mlp": "mlp"}  # transformers' per_layer_config "skip" names


class UnitKind(ABC):
    """One kind of prunable unit."""

    name: ClassVar[str]
    structural: ClassVar[bool]
    scopes: ClassVar[tuple[Scope, ...]]  # the sublayers its units live in
    description: ClassVar[str]

    @abstractmethod
    def count(self, geometry: Geometry, layer: int) -> int:
        """Units of this kind a layer has (0 where its sublayer is gone)."""

    @abstractmethod
    def params_per_unit(self, geometry: Geometry, layer: int) -> int:
        """Parameters removed with one unit of this kind in this layer."""

    def __repr__(self) -> str:
        return f"<unit kind {self.name}>"


def slice_linear(linear: nn.Linear, axis: str, indices: torch.Tensor) -> None:
    """Keep only ``indices`` along ``axis`` ("out" = rows, "in" = columns) of a Linear, in place."""
    indices = indices.to(linear.weight.device)
    dim = 0 if axis == "out" else 1
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(
        linear.weight.detach().index_select(dim, indices).contiguous(), requires_grad=requires_grad
    )
    if axis == "out":
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.detach().index_select(0, indices).contiguous(), requires_grad=requires_grad
            )
        linear.out_features = len(indices)
    else:
        linear.in_features = len(indices)


class WidthKind(UnitKind):
    """Many units per layer, each owning consecutive rows/columns of the projections in ``roles``."""

    structural = False
    geometry_field: ClassVar[str]  # the Geometry field holding this kind's count per layer
    roles: ClassVar[tuple[ProjectionRole, ...]]
    min_kept: ClassVar[int] = 1  # a sublayer that stays keeps at least this many units

    def count(self, geometry: Geometry, layer: int) -> int:
        return getattr(geometry, self.geometry_field)[layer]

    @abstractmethod
    def config_entries(self, geometry: Geometry, units: int) -> dict[str, int]:
        """The per-layer config attributes that describe a layer keeping ``units`` of this kind."""

    @abstractmethod
    def sync_attributes(self, block: nn.Module, geometry: Geometry, units: int) -> None:
        """Keep the head/width counts some transformers versions cache on the block truthful."""

    def kept_indices(self, role: ProjectionRole, geometry: Geometry, kept_units) -> torch.Tensor:
        """Rows (axis "out") or columns (axis "in") of a projection that the kept units own, ascending."""
        width = geometry.indices_per_unit(role)
        units = torch.as_tensor(list(kept_units), dtype=torch.long)
        return (units.unsqueeze(1) * width + torch.arange(width)).flatten()

    def slice(self, layer: nn.Module, adapter: FamilyAdapter, geometry: Geometry, index: int, kept_units) -> None:
        """Physically keep only ``kept_units`` of this kind in one decoder layer (in place)."""
        full = self.count(geometry, index)
        if len(kept_units) == full:
            return
        for role in self.roles:
            slice_linear(adapter.projection(layer, role), role.axis, self.kept_indices(role, geometry, kept_units))
        self.sync_attributes(adapter.block(layer, self.roles[0]), geometry, len(kept_units))

    def mask(self, layer: nn.Module, adapter: FamilyAdapter, geometry: Geometry, kept_units) -> None:
        """Reference: zero the output-projection columns of the units not kept (in place)."""
        for role in self.roles:
            if role.axis != "in":
                continue
            weight = adapter.projection(layer, role).weight
            keep = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
            keep[self.kept_indices(role, geometry, kept_units).to(weight.device)] = True
            weight[:, ~keep] = 0


class StructuralKind(UnitKind):
    """One unit per layer: whole sublayers (with the norm in front of each)."""

    structural = True

    def count(self, geometry: Geometry, layer: int) -> int:
        present = [
            geometry.has_attention(layer) if scope == "attn" else geometry.has_mlp(layer) for scope in self.scopes
        ]
        return int(all(present))

    def params_per_unit(self, geometry: Geometry, layer: int) -> int:
        return sum(geometry.sublayer_params(layer, scope) for scope in self.scopes)

    def remove(self, layer: nn.Module, adapter: FamilyAdapter) -> None:
        """Physically drop the sublayers (the caller drops a layer left with none)."""
        for scope in self.scopes:
            skip_sublayer(layer, SKIP_NAMES[scope])

    def mask(self, layer: nn.Module, adapter: FamilyAdapter) -> None:
        """Reference: the sublayers add nothing to the residual stream (output projection and bias zeroed)."""
        for scope in self.scopes:
            block = adapter.sublayer(layer, scope)
            output = block.o_proj if scope == "attn" else block.down_proj
            output.weight.zero_()
            if output.bias is not None:
                output.bias.zero_()
