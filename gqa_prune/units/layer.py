"""``layer``: a whole decoder layer (both sublayers); surgery drops it and renumbers the KV cache slots."""

from __future__ import annotations

from .base import StructuralKind


class Layer(StructuralKind):
    name = "layer"
    scopes = ("attn", "mlp")
    description = "decoder layer (attention and MLP)"


LAYER = Layer()
