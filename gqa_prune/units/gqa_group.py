"""``gqa_group``: one KV head with all of its query heads (q rows, k and v rows, o columns, q/k/v bias rows).

Removing whole groups keeps the pairing of every remaining query head with its own KV head and the
query/KV ratio of the layer; a layer that keeps its attention keeps at least one group.
"""

from __future__ import annotations

from torch import nn

from ..arch import ATTENTION_ROLES, Geometry
from ..errors import GqaPruneError
from .base import WidthKind


class GqaGroup(WidthKind):
    name = "gqa_group"
    scopes = ("attn",)
    geometry_field = "kv_groups"
    roles = ATTENTION_ROLES
    description = "GQA group: a KV head with its query heads"

    def params_per_unit(self, geometry: Geometry, layer: int) -> int:
        return geometry.params_per_group

    def config_entries(self, geometry: Geometry, units: int) -> dict[str, int]:
        return {"num_attention_heads": units * geometry.heads_per_group, "num_key_value_heads": units}

    def sync_attributes(self, block: nn.Module, geometry: Geometry, units: int) -> None:
        for name, value in (
            ("num_heads", units * geometry.heads_per_group),
            ("num_attention_heads", units * geometry.heads_per_group),
            ("num_key_value_heads", units),
        ):
            if hasattr(block, name):
                setattr(block, name, value)
        if getattr(block, "num_key_value_groups", geometry.heads_per_group) != geometry.heads_per_group:
            raise GqaPruneError("query heads per KV head changed during surgery; this is a bug in gqa-prune")


GQA_GROUP = GqaGroup()
