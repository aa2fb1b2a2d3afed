"""``expert_channel``: one intermediate channel of one routed expert (its gate and up rows, its down column, in
the fused expert tensors; gpt-oss's interleaved gate/up pair and their biases).

The fused tensors hold one width per layer, so every expert of a layer keeps the same number of channels,
each expert its own ones. The masked reference zeroes the down_proj columns of the channels not kept (what
they add to the expert's output); the physically pruned experts must give the same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..moe import ExpertGeometry, MoeFamily
from .base import UnitKind


class ExpertChannel(UnitKind):
    name = "expert_channel"
    structural = False
    scopes = ("mlp",)
    description = "expert channel: a gate/up row and a down column of one routed expert"

    def count(self, geometry: ExpertGeometry, layer: int) -> int:
        """Channels of each expert of the layer."""
        return geometry.widths[layer]

    def params_per_unit(self, geometry: ExpertGeometry, layer: int) -> int:
        return geometry.params_per_channel

    def slice(self, block: nn.Module, family: MoeFamily, kept: Sequence[tuple[int, ...]]) -> None:
        """Keep channels ``kept[e]`` of the block's e-th expert (in place)."""
        family.layout.slice_channels(block.experts, list(kept))

    def mask(self, block: nn.Module, family: MoeFamily, kept: Sequence[tuple[int, ...]]) -> None:
        """Reference: zero the down_proj columns of the channels not kept (in place)."""
        family.layout.mask_channels(block.experts, list(kept))


EXPERT_CHANNEL = ExpertChannel()
