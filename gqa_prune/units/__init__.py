"""Unit kinds, one module each behind the protocol in ``base``: the registry the plan, surgery and scores use.

Adding a kind is one module defining a ``WidthKind`` or ``StructuralKind`` and a line here. The kinds of
mixture-of-experts layers (``expert``, ``expert_channel``, ``shared_channel``) have plans of their own
(``gqa_prune.expert_plan``).
"""

from __future__ import annotations

from ..arch import Scope
from .attn_sublayer import ATTN_SUBLAYER
from .base import SKIP_NAMES, StructuralKind, UnitKind, WidthKind, slice_linear
from .expert import EXPERT
from .expert_channel import EXPERT_CHANNEL
from .gqa_group import GQA_GROUP
from .layer import LAYER
from .mlp_channel import MLP_CHANNEL
from .mlp_sublayer import MLP_SUBLAYER
from .shared_channel import SHARED_CHANNEL

# largest first: a plan applies structural removals before width slicing
KINDS: dict[str, UnitKind] = {kind.name: kind for kind in (LAYER, ATTN_SUBLAYER, MLP_SUBLAYER, GQA_GROUP, MLP_CHANNEL)}
WIDTH_KINDS: tuple[WidthKind, ...] = tuple(kind for kind in KINDS.values() if isinstance(kind, WidthKind))
STRUCTURAL_KINDS: tuple[StructuralKind, ...] = tuple(
    kind for kind in KINDS.values() if isinstance(kind, StructuralKind)
)
# the kinds of mixture-of-experts layers (plans of their own: gqa_prune.expert_plan)
EXPERT_KINDS: dict[str, UnitKind] = {kind.name: kind for kind in (EXPERT, EXPERT_CHANNEL, SHARED_CHANNEL)}
SUBLAYER_KINDS: dict[Scope, StructuralKind] = {
    kind.scopes[0]: kind for kind in STRUCTURAL_KINDS if len(kind.scopes) == 1
}


def width_kind(scope: Scope) -> WidthKind:
    """The width kind living in a sublayer ("attn" -> gqa_group, "mlp" -> mlp_channel)."""
    return next(kind for kind in WIDTH_KINDS if kind.scopes == (scope,))


__all__ = [
    "KINDS", "WIDTH_KINDS", "STRUCTURAL_KINDS", "SUBLAYER_KINDS", "SKIP_NAMES", "UnitKind", "WidthKind",
    "StructuralKind", "slice_linear", "width_kind", "GQA_GROUP", "MLP_CHANNEL", "ATTN_SUBLAYER", "MLP_SUBLAYER",
    "LAYER", "EXPERT", "EXPERT_CHANNEL", "SHARED_CHANNEL", "EXPERT_KINDS",
]  # fmt: skip
