"""``expert``: one routed expert of a sparse MoE layer (its slice of every fused expert tensor, its router row
and router bias).

Physically, removal keeps the same indices along the first axis of every router and expert tensor, so
kept expert j of the pruned layer is original expert ``kept[j]``. The masked reference leaves the weights
alone and gives the removed experts a router logit of -inf before the family's routing rule: no token is
routed to them and the softmax runs over the kept experts only, which is what the pruned router computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..moe import ExpertGeometry, MoeFamily, expert_tensors
from .base import UnitKind

# attributes that cache the expert count on a block, its router or its experts
_COUNT_ATTRIBUTES = ("num_experts", "num_local_experts")


class Expert(UnitKind):
    name = "expert"
    structural = False
    scopes = ("mlp",)
    description = "expert: its fused weights and biases, with its router row"

    def count(self, geometry: ExpertGeometry, layer: int) -> int:
        return geometry.experts[layer]

    def params_per_unit(self, geometry: ExpertGeometry, layer: int) -> int:
        return geometry.params_per_expert(layer)

    def slice(self, block: nn.Module, family: MoeFamily, kept: Sequence[int]) -> None:
        """Keep only the experts ``kept`` (ascending) of a sparse block, in place."""
        router = family.router(block)
        index = torch.as_tensor(list(kept), dtype=torch.long, device=router.weight.device)
        for module in (router, block.experts):
            for name, tensor in expert_tensors(module).items():
                kept_tensor = tensor.detach().index_select(0, index).contiguous()
                if isinstance(tensor, nn.Parameter):
                    setattr(module, name, nn.Parameter(kept_tensor, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(name, kept_tensor)
        for module in (router, block.experts, block):
            for attribute in _COUNT_ATTRIBUTES:
                if isinstance(getattr(module, attribute, None), int):
                    setattr(module, attribute, len(kept))

    def mask(self, block: nn.Module, family: MoeFamily, config, kept: Sequence[int]):
        """Reference: route no token to the experts not kept (router logits -inf); returns the hook handle."""
        router = family.router(block)
        routing, top_k = family.routing(config), int(config.num_experts_per_tok)
        removed = sorted(set(range(router.weight.shape[0])) - set(kept))

        def masked_routing(module, inputs, output):
            logits, gates, _ = output
            masked = logits.float().clone()
            masked[..., removed] = float("-inf")
            masked_gates, indices = routing.route(masked, top_k)
            return logits, masked_gates.to(gates.dtype), indices

        return router.register_forward_hook(masked_routing)


EXPERT = Expert()
