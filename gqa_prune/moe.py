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
from .modeling_gqa_prune import PRUNED_DECODER_LAYERS, sublayer_attributes


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


_WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size")  # the expert width cached on experts modules


@dataclass(frozen=True)
class ExpertLayout:
    """How one family fuses its experts' MLPs, for what acts on their intermediate channels.

    ``interleaved`` (gpt-oss): ``gate_up_proj [E, H, 2I]`` with gate and up channels alternating, a
    ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]`` and a per-expert ``down_proj_bias``; otherwise
    ``gate_up_proj [E, 2I, H]`` (the I gate rows, then the I up rows) and ``down_proj [E, H, I]``.
    """

    interleaved: bool = False

    def width(self, experts: nn.Module) -> int:
        return int(experts.down_proj.shape[1 if self.interleaved else 2])

    def activation(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activations [tokens, I] of one expert on inputs ``x`` [tokens, H]."""
        if self.interleaved:
            return experts._apply_gate(x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert])
        gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def down_columns(self, experts: nn.Module, expert: int) -> torch.Tensor:
        """[H, I]: column c is what channel c writes to the residual stream per unit of activation."""
        down = experts.down_proj[expert]
        return down.T if self.interleaved else down

    def output(self, experts: nn.Module, expert: int, activation: torch.Tensor) -> torch.Tensor:
        """One expert's output [tokens, H] from its activations (before the router's gate)."""
        out = activation @ self.down_columns(experts, expert).T
        return out + experts.down_proj_bias[expert] if self.interleaved else out

    def _indices(self, kept: torch.Tensor, width: int) -> dict[str, tuple[int, torch.Tensor]]:
        """Parameter name -> (axis after the expert axis, indices) that keep channels ``kept``."""
        if self.interleaved:
            pairs = torch.stack([2 * kept, 2 * kept + 1], dim=1).flatten()
            return {"gate_up_proj": (1, pairs), "gate_up_proj_bias": (0, pairs), "down_proj": (0, kept)}
        return {"gate_up_proj": (0, torch.cat([kept, width + kept])), "down_proj": (1, kept)}

    @property
    def channel_tensors(self) -> tuple[str, ...]:
        """The expert tensors that hold one slice per intermediate channel."""
        return tuple(self._indices(torch.zeros(0, dtype=torch.long), 0))

    def slice_channels(self, experts: nn.Module, kept: list[tuple[int, ...]]) -> None:
        """Keep channels ``kept[e]`` (same count for every expert, ascending) of each expert, in place."""
        width = self.width(experts)
        per_expert = [self._indices(torch.as_tensor(channels, dtype=torch.long), width) for channels in kept]
        for name in self.channel_tensors:
            tensor = getattr(experts, name).detach()
            rows = [tensor[expert].index_select(*per_expert[expert][name]) for expert in range(len(kept))]
            requires_grad = getattr(experts, name).requires_grad
            setattr(experts, name, nn.Parameter(torch.stack(rows).contiguous(), requires_grad=requires_grad))
        for attribute in _WIDTH_ATTRIBUTES:
            if isinstance(getattr(experts, attribute, None), int):
                setattr(experts, attribute, len(kept[0]))

    def mask_channels(self, experts: nn.Module, kept: list[tuple[int, ...]]) -> None:
        """Reference: zero the down_proj columns of every channel not kept (in place)."""
        for expert, channels in enumerate(kept):
            removed = sorted(set(range(self.width(experts))) - set(channels))
            down = experts.down_proj.data[expert]
            if self.interleaved:
                down[removed, :] = 0
            else:
                down[:, removed] = 0


@dataclass(frozen=True)
class SharedMlp:
    """A dense MLP every token passes beside the routed experts (Qwen2-MoE's shared expert, Granite's shared
    MLP), whose intermediate channels are pruned like a dense model's MLP channels: ``gate_proj`` / ``up_proj``
    rows and ``down_proj`` columns, or (``fused``) ``input_linear`` rows c and I + c and ``output_linear``
    columns."""

    path: str  # from the decoder layer
    width_key: str  # the config key holding its intermediate channels
    fused: bool = False

    def module(self, layer: nn.Module) -> nn.Module | None:
        try:
            module = layer.get_submodule(self.path)
        except AttributeError:  # e.g. Qwen2-MoE's dense `mlp_only_layers`
            return None
        return module if hasattr(module, "output_linear" if self.fused else "down_proj") else None

    def inputs(self, mlp: nn.Module) -> tuple[nn.Linear, ...]:
        return (mlp.input_linear,) if self.fused else (mlp.gate_proj, mlp.up_proj)

    def output(self, mlp: nn.Module) -> nn.Linear:
        return mlp.output_linear if self.fused else mlp.down_proj

    def width(self, mlp: nn.Module) -> int:
        return int(self.output(mlp).in_features)

    def input_rows(self, kept: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of each input projection that channels ``kept`` own."""
        return torch.cat([kept, width + kept]) if self.fused else kept


@dataclass(frozen=True)
class MoeFamily:
    """One supported MoE family: its stock class and where the sparse block, router and experts live."""

    family: str  # the config's model_type
    model_class: type[PreTrainedModel]
    block_attr: str  # the sparse block on the decoder layer
    router_attr: str  # the router on the sparse block
    experts_key: str  # the config key holding the number of experts per layer
    width_key: str  # the config key holding the intermediate channels of one expert
    softmax_first: bool
    renormalize_key: str | None  # config flag for softmax-first renormalisation; None = always
    shared_expert: str | None = None  # what a layer has besides its routed experts (kept whole)
    state_space: bool = False  # has state-space (Mamba) layers, kept whole
    layout: ExpertLayout = ExpertLayout()
    heads_normed_together: bool = False  # q/k norms span all heads: removing a head changes the others
    shared_mlp: SharedMlp | None = None

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
        MoeFamily("mixtral", MixtralForCausalLM, "mlp", "gate", "num_local_experts", "intermediate_size", True, None),
        MoeFamily(
            "qwen2_moe", Qwen2MoeForCausalLM, "mlp", "gate", "num_experts", "moe_intermediate_size", True,
            "norm_topk_prob", shared_expert="a shared expert with its own sigmoid gate",
            shared_mlp=SharedMlp("mlp.shared_expert", "shared_expert_intermediate_size"),
        ),
        MoeFamily(
            "qwen3_moe", Qwen3MoeForCausalLM, "mlp", "gate", "num_experts", "moe_intermediate_size", True,
            "norm_topk_prob",
        ),
        MoeFamily(
            "olmoe", OlmoeForCausalLM, "mlp", "gate", "num_experts", "intermediate_size", True, "norm_topk_prob",
            heads_normed_together=True,
        ),
        MoeFamily(
            "gpt_oss", GptOssForCausalLM, "mlp", "router", "num_local_experts", "intermediate_size", False, None,
            layout=ExpertLayout(interleaved=True),
        ),
        MoeFamily(
            "granitemoehybrid", GraniteMoeHybridForCausalLM, "block_sparse_moe", "router", "num_local_experts",
            "intermediate_size", False, None, shared_expert="a dense shared MLP", state_space=True,
            shared_mlp=SharedMlp("shared_mlp", "shared_intermediate_size", fused=True),
        ),
    )
}  # fmt: skip
ATTENTION_ATTR = "self_attn"  # the attention block of a decoder layer (absent on state-space layers)
PRUNED_PREFIX = "gqa_pruned_"  # model_type of the project's classes: gqa_pruned_<stock model_type>
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# the sublayers a plan may remove from a decoder layer (per_layer_config "skip" names): the attention block, and
# the MoE block (routed experts with any shared expert / shared MLP), each with the norm in front of it
SUBLAYERS = ("attention", "mlp")


def is_moe_type(model_type: str | None) -> bool:
    """Whether a config's model_type is a supported MoE family (stock, or the project's per-layer class)."""
    return str(model_type).removeprefix(PRUNED_PREFIX) in MOE_FAMILIES


def declares_experts(config) -> bool:
    """Whether a config describes a mixture of experts (any family, supported or not)."""
    return any(isinstance(getattr(config, key, None), int) and getattr(config, key) > 0 for key in EXPERT_COUNT_KEYS)


def moe_family_for(config) -> MoeFamily | None:
    """The MoE family of a config, stock or of the project's per-layer class (None for a dense model); a MoE
    layout gqa-prune does not know is refused."""
    family = MOE_FAMILIES.get(str(getattr(config, "model_type", None)).removeprefix(PRUNED_PREFIX))
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
    """The prunable shape of a (possibly pruned) MoE model.

    Experts: per decoder layer how many (0 = dense MLP) and how many intermediate channels each has, top-k,
    and what one expert owns: ``expert_fixed_params`` (its router row and bias, gpt-oss's down_proj bias)
    plus ``params_per_channel`` per channel (a gate and an up row, a down column, gpt-oss's gate/up biases).
    Attention: per decoder layer its KV heads (``kv_groups``; 0 = no attention, e.g. a Mamba layer; empty
    when read from scores written before groups were recorded), query heads per KV head, head_dim, and what
    one GQA group owns (q, k, v rows with biases, o_proj columns, gpt-oss's attention sinks). Shared MLPs: per
    decoder layer their intermediate channels (``shared_widths``; 0 = none; empty when not recorded) and what
    one channel owns.
    """

    family: str
    top_k: int
    experts: tuple[int, ...]  # per decoder layer
    widths: tuple[int, ...]  # per decoder layer: intermediate channels of each expert (0 = dense MLP)
    params_per_channel: int
    expert_fixed_params: int
    kv_groups: tuple[int, ...] = ()
    heads_per_group: int = 0
    head_dim: int = 0
    params_per_group: int = 0
    shared_widths: tuple[int, ...] = ()
    params_per_shared_channel: int = 0
    layer_params: tuple[int, ...] = ()  # per decoder layer: all its parameters (empty when not recorded)
    # per decoder layer: the parameters of each of its SUBLAYERS (0 where absent, e.g. a Mamba layer's attention;
    # empty when not recorded)
    sublayer_params: tuple[tuple[int, ...], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(index for index, count in enumerate(self.experts) if count)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(index for index, count in enumerate(self.kv_groups) if count)

    def params_per_expert(self, layer: int) -> int:
        return self.expert_fixed_params + self.widths[layer] * self.params_per_channel

    @property
    def expert_params(self) -> int:
        """Parameters owned by experts (what ratios of experts and channels are measured against)."""
        return sum(count * self.params_per_expert(layer) for layer, count in enumerate(self.experts))

    @property
    def group_params(self) -> int:
        """Parameters owned by GQA groups (all of attention but its norms and output bias)."""
        return sum(self.kv_groups) * self.params_per_group

    @property
    def shared_params(self) -> int:
        """Parameters owned by shared-MLP channels (all of a shared MLP but its output bias)."""
        return sum(self.shared_widths) * self.params_per_shared_channel

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "experts": list(self.experts),
            "widths": list(self.widths),
            "kv_groups": list(self.kv_groups),
            "shared_widths": list(self.shared_widths),
            "layer_params": list(self.layer_params),
            "sublayer_params": [list(sizes) for sizes in self.sublayer_params],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExpertGeometry:
        try:
            return cls(
                data["family"], int(data["top_k"]), tuple(data["experts"]), tuple(data["widths"]),
                int(data["params_per_channel"]), int(data["expert_fixed_params"]),
                tuple(data.get("kv_groups", ())), int(data.get("heads_per_group", 0)), int(data.get("head_dim", 0)),
                int(data.get("params_per_group", 0)), tuple(data.get("shared_widths", ())),
                int(data.get("params_per_shared_channel", 0)), tuple(data.get("layer_params", ())),
                tuple(tuple(sizes) for sizes in data.get("sublayer_params", ())),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise GqaPruneError(f"expert geometry is malformed ({error!r})") from error


def expert_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a router or experts module, by name (directly owned only)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def check_block_layout(block: nn.Module, family: MoeFamily, where: str) -> int:
    """The number of experts of a sparse block; every router and expert tensor must index experts first."""
    router = family.router(block)
    count = int(router.weight.shape[0])
    missing = [name for name in family.layout.channel_tensors if not hasattr(block.experts, name)]
    if missing:
        raise GqaPruneError(
            f"{where}: the experts have no {missing[0]}; gqa-prune does not know this {family.family} expert layout"
        )
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
    counts, widths, owned = [], [], None
    for index, layer in enumerate(family.decoder_layers(model)):
        block = family.sparse_block(layer)
        if block is None:
            counts.append(0)
            widths.append(0)
            continue
        count = check_block_layout(block, family, f"layer {index}")
        width = family.layout.width(block.experts)
        counts.append(count)
        widths.append(width)
        if owned is None:
            owned = _owned_params(block, family, width)
    if owned is None:
        raise GqaPruneError(f"this {family.family} model has no layer with experts")
    per_channel, fixed = owned
    layers = family.decoder_layers(model)
    return ExpertGeometry(
        family.family, int(model.config.num_experts_per_tok), tuple(counts), tuple(widths), per_channel, fixed,
        **attention_shape(layers), **_shared_shape(family, layers),
        layer_params=tuple(sum(parameter.numel() for parameter in layer.parameters()) for layer in layers),
        sublayer_params=tuple(_sublayer_sizes(family, layer) for layer in layers),
    )  # fmt: skip


def _sublayer_sizes(family: MoeFamily, layer: nn.Module) -> tuple[int, ...]:
    """Parameters of each of a decoder layer's SUBLAYERS: its block(s) and the norm in front (0 without the
    block: a Mamba layer has no attention to remove, a removed sublayer nothing left)."""
    sizes = []
    for name in SUBLAYERS:
        modules = [getattr(layer, attribute, None) for attribute in sublayer_parts(family, name)]
        sizes.append(
            0 if modules[0] is None else sum(p.numel() for m in modules if m is not None for p in m.parameters())
        )
    return tuple(sizes)


def sublayer_parts(family: MoeFamily, name: str) -> tuple[str, ...]:
    """The decoder-layer attributes that make up sublayer ``name`` in ``family`` (block(s) first, norm last)."""
    return sublayer_attributes(PRUNED_DECODER_LAYERS[family.family], name)


def attention_block(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's attention block; None on a state-space layer or where a plan removed it."""
    return getattr(layer, ATTENTION_ATTR, None)


def attention_shape(layers: nn.ModuleList) -> dict[str, object]:
    """KV heads per layer, query heads per KV head, head_dim and the parameters one GQA group owns."""
    kv_groups, first = [], None
    for layer in layers:
        attention = attention_block(layer)
        if attention is None:
            kv_groups.append(0)
            continue
        kv_groups.append(attention.k_proj.out_features // int(attention.head_dim))
        first = first or (attention, kv_groups[-1])
    if first is None:
        return {"kv_groups": tuple(kv_groups)}
    attention, groups = first
    # from in/out features, so a GPTQ-packed attention (weights in buffers) reads the same
    inputs = [attention.q_proj, attention.k_proj, attention.v_proj]
    owned = sum(linear.in_features * linear.out_features for linear in [*inputs, attention.o_proj])
    owned += sum(linear.bias.numel() for linear in inputs if isinstance(getattr(linear, "bias", None), torch.Tensor))
    if isinstance(getattr(attention, "sinks", None), torch.Tensor):  # gpt-oss: one learned sink per query head
        owned += attention.sinks.numel()
    return {
        "kv_groups": tuple(kv_groups),
        "heads_per_group": int(attention.num_key_value_groups),
        "head_dim": int(attention.head_dim),
        "params_per_group": owned // groups,
    }


def _shared_shape(family: MoeFamily, layers: nn.ModuleList) -> dict[str, object]:
    """Channels of every layer's shared MLP (0 where none) and the parameters one channel owns."""
    shared = family.shared_mlp
    modules = [None if shared is None else shared.module(layer) for layer in layers]
    widths = tuple(0 if mlp is None else shared.width(mlp) for mlp in modules)
    first = next((mlp for mlp in modules if mlp is not None), None)
    if first is None:
        return {"shared_widths": widths}
    inputs = shared.inputs(first)
    owned = sum(linear.in_features * linear.out_features for linear in inputs)
    owned += sum(linear.bias.numel() for linear in inputs if isinstance(getattr(linear, "bias", None), torch.Tensor))
    owned += shared.output(first).out_features * shared.width(first)
    return {"shared_widths": widths, "params_per_shared_channel": owned // shared.width(first)}


def _owned_params(block: nn.Module, family: MoeFamily, width: int) -> tuple[int, int]:
    """(parameters per channel, parameters of one expert that belong to no channel: router row and bias,
    biases of its output)."""
    channel_tensors = family.layout.channel_tensors
    experts = expert_tensors(block.experts)
    per_channel = sum(experts[name][0].numel() for name in channel_tensors) // width
    fixed = sum(tensor[0].numel() for name, tensor in experts.items() if name not in channel_tensors)
    fixed += sum(tensor[0].numel() for tensor in expert_tensors(family.router(block)).values())
    return per_channel, fixed
