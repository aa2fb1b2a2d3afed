"""Mixture-of-experts layouts: where each supported MoE family keeps its router and its fused experts, how
it routes tokens, and the expert geometry of a model. Pure (torch and transformers classes); no I/O.

In transformers 5 every supported family stores its experts as fused 3-D parameters whose first axis is the
expert (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; gpt-oss transposed and interleaved, with
biases ``[E, ...]``) and routes with a ``[E, H]`` router weight (gpt-oss adds a ``[E]`` bias). Removing an
expert is therefore the same operation in every family: keep the same indices along the first axis of
every router and expert tensor. What differs is the routing rule, needed for the masked reference:

- softmax over all experts, then top-k; the top-k probabilities renormalised to sum to 1 always (Mixtral)
  or when ``norm_topk_prob`` is set (Qwen2-MoE, Qwen3-MoE, OLMoE);
- top-k of the logits, then a softmax over those k (gpt-oss, GraniteMoeHybrid): always sums to 1.

A router that renormalises gives the kept experts of a token exactly the gates they had among themselves in
the dense model; one that does not (``norm_topk_prob=False``) gives them the softmax over the kept experts
only, larger than their dense gates by the probability mass the removed experts held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (
    GptOssForCausalLM,
    GraniteMoeHybridForCausalLM,
    MixtralForCausalLM,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
)

from .errors import GqaPruneError


@dataclass(frozen=True)
class Routing:
    """How a router turns logits into the top-k gates of every token."""

    softmax_first: bool  # softmax over all experts then top-k (else top-k logits then softmax over k)
    renormalize: bool  # softmax-first routers: rescale the top-k probabilities to sum to 1

    def route(self, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates [tokens, k], expert indices [tokens, k]) from router logits [tokens, experts]."""
        logits = logits.float()
        if self.softmax_first:
            gates, indices = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
            if self.renormalize:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            return gates, indices
        top_logits, indices = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1), indices


@dataclass(frozen=True)
class MoeFamily:
    """One supported MoE family: its stock class and where the sparse block, router and experts live."""

    family: str  # the config's model_type
    model_class: type[PreTrainedModel]
    block_attr: str  # the sparse block on the decoder layer
    router_attr: str  # the router on the sparse block
    experts_key: str  # the config key holding the number of experts per layer
    softmax_first: bool
    renormalize_key: str | None  # config flag for softmax-first renormalisation; None = always
    shared_expert: str | None = None  # what a layer has besides its routed experts (kept whole)
    state_space: bool = False  # has state-space (Mamba) layers, kept whole

    def routing(self, config) -> Routing:
        renormalize = True if self.renormalize_key is None else bool(getattr(config, self.renormalize_key))
        return Routing(self.softmax_first, renormalize)

    def sparse_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block, or None where the layer's MLP is dense."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, self.router_attr) or not hasattr(block, "experts"):
            return None
        return block

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule("model.layers")


MOE_FAMILIES = {
    family.family: family
    for family in (
        MoeFamily("mixtral", MixtralForCausalLM, "mlp", "gate", "num_local_experts", True, None),
        MoeFamily(
            "qwen2_moe", Qwen2MoeForCausalLM, "mlp", "gate", "num_experts", True, "norm_topk_prob",
            shared_expert="a shared expert with its own sigmoid gate",
        ),
        MoeFamily("qwen3_moe", Qwen3MoeForCausalLM, "mlp", "gate", "num_experts", True, "norm_topk_prob"),
        MoeFamily("olmoe", OlmoeForCausalLM, "mlp", "gate", "num_experts", True, "norm_topk_prob"),
        MoeFamily("gpt_oss", GptOssForCausalLM, "mlp", "router", "num_local_experts", False, None),
        MoeFamily(
            "granitemoehybrid", GraniteMoeHybridForCausalLM, "block_sparse_moe", "router", "num_local_experts",
            False, None, shared_expert="a dense shared MLP", state_space=True,
        ),
    )
}  # fmt: skip
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def declares_experts(config) -> bool:
    """Whether a config describes a mixture of experts (any family, supported or not)."""
    return any(isinstance(getattr(config, key, None), int) and getattr(config, key) > 0 for key in EXPERT_COUNT_KEYS)


def moe_family_for(config) -> MoeFamily | None:
    """The MoE family of a config (None for a dense model); a MoE layout gqa-prune does not know is refused."""
    family = MOE_FAMILIES.get(getattr(config, "model_type", None))
    if family is not None:
        return family
    if declares_experts(config):
        raise GqaPruneError(
            f"unsupported mixture-of-experts layout {config.model_type!r}: gqa-prune prunes the experts of "
            f"{', '.join(MOE_FAMILIES)}"
        )
    return None


@dataclass(frozen=True)
class ExpertGeometry:
    """The experts of a (possibly pruned) MoE model: per decoder layer how many (0 = dense MLP), top-k, and
    the parameters one expert owns (its fused weights and biases, plus its router row and bias)."""

    family: str
    top_k: int
    experts: tuple[int, ...]  # per decoder layer
    params_per_expert: int

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(index for index, count in enumerate(self.experts) if count)

    @property
    def expert_params(self) -> int:
        """Parameters owned by experts (what an expert ratio is measured against)."""
        return sum(self.experts) * self.params_per_expert

    def to_dict(self) -> dict:
        return {**asdict(self), "experts": list(self.experts)}

    @classmethod
    def from_dict(cls, data: dict) -> ExpertGeometry:
        try:
            return cls(data["family"], int(data["top_k"]), tuple(data["experts"]), int(data["params_per_expert"]))
        except (KeyError, TypeError, ValueError) as error:
            raise GqaPruneError(f"expert geometry is malformed ({error!r})") from error


def expert_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a router or experts module, by name (directly owned only)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def check_block_layout(block: nn.Module, family: MoeFamily, where: str) -> int:
    """The number of experts of a sparse block; every router and expert tensor must index experts first."""
    router = family.router(block)
    count = int(router.weight.shape[0])
    for part, module in (("router", router), ("experts", block.experts)):
        for name, tensor in expert_tensors(module).items():
            if tensor.dim() == 0 or tensor.shape[0] != count:
                raise GqaPruneError(
                    f"{where}: {part}.{name} has shape {tuple(tensor.shape)}, not {count} experts first; "
                    f"gqa-prune does not know this {family.family} expert layout"
                )
    return count


def expert_geometry_of(model: nn.Module) -> ExpertGeometry:
    """Read the experts from the modules themselves (the truth after surgery)."""
    family = moe_family_for(model.config)
    if family is None:
        raise GqaPruneError(f"{model.config.model_type!r} has no mixture-of-experts layers")
    counts, per_expert = [], None
    for index, layer in enumerate(family.decoder_layers(model)):
        block = family.sparse_block(layer)
        if block is None:
            counts.append(0)
            continue
        count = check_block_layout(block, family, f"layer {index}")
        counts.append(count)
        if per_expert is None:
            tensors = [*expert_tensors(family.router(block)).values(), *expert_tensors(block.experts).values()]
            per_expert = sum(tensor.numel() for tensor in tensors) // count
    if per_expert is None:
        raise GqaPruneError(f"this {family.family} model has no layer with experts")
    return ExpertGeometry(family.family, int(model.config.num_experts_per_tok), tuple(counts), per_expert)
