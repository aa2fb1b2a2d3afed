"""``attn_sublayer``: a layer's whole attention block and the norm in front of it; the residual passes through."""

from __future__ import annotations

from .base import StructuralKind


class AttnSublayer(StructuralKind):
    name = "attn_sublayer"
    scopes = ("attn",)
    description = "attention sublayer (q/k/v/o and its input norm)"


ATTN_SUBLAYER = AttnSublayer()
