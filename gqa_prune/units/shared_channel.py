"""``shared_channel``: one intermediate channel of a mixture of experts' shared MLP (Qwen2-MoE's shared expert,
Granite's shared MLP): its gate and up rows and its down column, as an MLP channel of a dense model.

Every layer keeps the same number (the config holds one width). The masked reference zeroes the output
projection's columns of the channels not kept; the physically pruned MLP must give the same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..moe import ExpertGeometry, MoeFamily
from .base import UnitKind, slice_linear

_WIDTH_ATTRIBUTES = ("intermediate_size",)  # cached on some MLP modules


class SharedChannel(UnitKind):
    name = "shared_channel"
    structural = False
    scopes = ("mlp",)
    description = "shared-expert channel: a gate/up row and a down column of a MoE layer's shared MLP"

    def count(self, geometry: ExpertGeometry, layer: int) -> int:
        return geometry.shared_widths[layer]

    def params_per_unit(self, geometry: ExpertGeometry, layer: int) -> int:
        return geometry.params_per_shared_channel

    def slice(self, layer: nn.Module, family: MoeFamily, kept: Sequence[int]) -> None:
        """Keep only channels ``kept`` (ascending) of the layer's shared MLP, in place."""
        shared = family.shared_mlp
        mlp = shared.module(layer)
        output = shared.output(mlp)
        index = torch.as_tensor(list(kept), dtype=torch.long)
        for linear in shared.inputs(mlp):
            slice_linear(linear, "out", shared.input_rows(index, output.in_features))
        slice_linear(output, "in", index)
        for attribute in _WIDTH_ATTRIBUTES:
            if isinstance(getattr(mlp, attribute, None), int):
                setattr(mlp, attribute, len(kept))

    def mask(self, layer: nn.Module, family: MoeFamily, kept: Sequence[int]) -> None:
        """Reference: zero the output projection's columns of the channels not kept (in place)."""
        output = family.shared_mlp.output(family.shared_mlp.module(layer))
        removed = sorted(set(range(output.in_features)) - set(kept))
        output.weight.data[:, removed] = 0


SHARED_CHANNEL = SharedChannel()
