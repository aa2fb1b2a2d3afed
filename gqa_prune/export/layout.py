"""How a (possibly heterogeneous) gqa-prune model maps onto llama.cpp's blocks: architecture and per-block sizes.

Uniform models (every layer has attention and an MLP of the same shape) go to their native llama.cpp
architecture (``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``), which every GGUF tool loads; llama.cpp's
``qwen2`` needs as many query dimensions as hidden ones, so a Qwen2 that lost the same groups in every layer
goes to ``deci`` too. Any other
shape goes to ``deci`` (written for Llama-3.1-Nemotron-51B), which reads per-layer arrays of query heads, KV
heads and MLP widths. Its graph has two traps that this layout works around, both checked against the real
engine by the tests:

- a block with ``feed_forward_length == 0`` skips the rest of the block, attention output included, so a
  layer that keeps attention but lost its MLP gets a tiny MLP of zeros (``ZERO_MLP_WIDTH`` channels: its
  output is exactly 0 in every number format);
- head size and rope dimension are read only when block 0 has query heads, so an attention-free block 0
  becomes deci's "linear attention" (query heads but no KV heads: ``attn_output`` applied to the normed
  input) with an all-zero ``attn_output``, which adds exactly 0.

Mixtures of experts go to llama.cpp's native MoE architectures (``expert_layout_for``), which take one
expert count, expert width and head count for every layer: uniform expert plans export, per-layer ones are
refused in one line, and so is a routing rule the architecture's graph does not compute (llama.cpp's
``llama``, ``qwen3moe`` and ``granitehybrid`` renormalise the top-k gates, ``qwen2moe`` and ``olmoe`` do not).
GraniteMoeHybrid's Mamba-2 layers are blocks without attention (0 KV heads in ``granitehybrid``'s arrays).

Pure: no I/O, no llama.cpp; the writer and the tests read the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..arch import Geometry
from ..errors import GqaPruneError
from ..moe import ExpertGeometry

ZERO_MLP_WIDTH = 32  # channels of the all-zero MLP of a block that lost its MLP (a whole quantization block)
NATIVE_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
HETEROGENEOUS_ARCHITECTURE = "deci"
HYBRID_ARCHITECTURE = "granitehybrid"  # Mamba-2 and attention layers: per-layer head arrays, 0 KV heads = Mamba

# zero: deci's linear attention with an all-zero output projection; none: no attention (a hybrid's Mamba layer)
Attention = Literal["full", "none", "zero"]
Mlp = Literal["full", "zero"]  # zero: ZERO_MLP_WIDTH channels of zeros


@dataclass(frozen=True)
class Block:
    """One llama.cpp block: the model layer it comes from and the sizes the GGUF's per-layer arrays hold."""

    layer: int  # index among the model's decoder layers
    attention: Attention
    mlp: Mlp
    head_count: int
    head_count_kv: int
    feed_forward_length: int


@dataclass(frozen=True)
class Experts:
    """The routed experts of every block of a mixture of experts, and its shared expert (0 = none)."""

    count: int
    used: int  # top-k
    width: int
    shared_width: int = 0


@dataclass(frozen=True)
class Layout:
    architecture: str
    blocks: tuple[Block, ...]
    experts: Experts | None = None

    @property
    def uniform(self) -> bool:
        return self.architecture not in (HETEROGENEOUS_ARCHITECTURE, HYBRID_ARCHITECTURE)

    def per_layer(self, field: str) -> int | list[int]:
        """A per-block size as the GGUF key holds it: one integer for a native architecture, else a list."""
        values = [getattr(block, field) for block in self.blocks]
        return values[0] if self.uniform else values


def _is_uniform(geometry: Geometry) -> bool:
    """Every layer whole and of one shape, and (llama.cpp's qwen2 builds q and o as hidden x hidden) expressible
    by the family's native architecture."""
    query_rows = geometry.kv_groups[0] * geometry.heads_per_group * geometry.head_dim
    return (
        (geometry.family != "qwen2" or query_rows == geometry.hidden_size)
        and all(groups > 0 for groups in geometry.kv_groups)
        and all(width > 0 for width in geometry.intermediate_sizes)
        and len(set(geometry.kv_groups)) == 1
        and len(set(geometry.intermediate_sizes)) == 1
    )


def layout_for(geometry: Geometry) -> Layout:
    """The architecture and blocks a model of this geometry is exported as, or a one-line refusal."""
    if _is_uniform(geometry):
        blocks = tuple(
            Block(layer, "full", "full", groups * geometry.heads_per_group, groups, width)
            for layer, (groups, width) in enumerate(zip(geometry.kv_groups, geometry.intermediate_sizes))
        )
        return Layout(NATIVE_ARCHITECTURES[geometry.family], blocks)
    if geometry.family == "qwen3":
        raise GqaPruneError(
            "a heterogeneous qwen3 model cannot be exported to GGUF: llama.cpp's per-layer architecture (deci) "
            "has no per-head q/k norms (Qwen3's QK-norm); only uniform qwen3 models (same shape in every layer) export"
        )
    blocks = []
    for layer, (groups, width) in enumerate(zip(geometry.kv_groups, geometry.intermediate_sizes)):
        if groups == 0 and width == 0:  # an identity layer: the residual passes it, so it is simply left out
            continue
        if groups > 0:
            attention, heads, kv_heads = "full", groups * geometry.heads_per_group, groups
        elif not blocks:  # the first block must have query heads for llama.cpp to read head_dim
            attention, heads, kv_heads = "zero", geometry.heads_per_group, 0
        else:
            attention, heads, kv_heads = "none", 0, 0
        mlp: Mlp = "full" if width > 0 else "zero"
        blocks.append(Block(layer, attention, mlp, heads, kv_heads, width if width > 0 else ZERO_MLP_WIDTH))
    if not blocks:
        raise GqaPruneError("the model has no layer left with attention or an MLP; there is nothing to export")
    return Layout(HETEROGENEOUS_ARCHITECTURE, tuple(blocks))


# MoE family -> (llama.cpp architecture, whether its graph renormalises the top-k gates, the projections it
# builds hidden x hidden: "q" (so no GQA group may be removed), "k" too (multi-head attention only))
MOE_ARCHITECTURES = {
    "mixtral": ("llama", True, ()),
    "qwen2_moe": ("qwen2moe", False, ("q",)),
    "qwen3_moe": ("qwen3moe", True, ()),
    "olmoe": ("olmoe", False, ("q", "k")),
    "granitemoehybrid": (HYBRID_ARCHITECTURE, True, ()),
}


# llama.cpp architectures that require an ``output`` tensor (a tied head is written twice for them)
OUTPUT_REQUIRED = ("qwen2moe", "olmoe")
# MoE families llama.cpp cannot run exactly, and why (checked against llama.cpp's source)
UNEXPORTABLE_MOE = {
    "gpt_oss": "llama.cpp's gpt-oss rounds YaRN's correction range to whole dimensions, the Hugging Face model "
    "does not (rope_parameters.truncate: false), so every position's rotation and the logits would differ",
}


def expert_layout_for(
    geometry: ExpertGeometry, hidden_size: int, renormalises: bool, state_space: tuple[bool, ...] = ()
) -> Layout:
    """The native llama.cpp architecture and blocks of a mixture of experts, or a one-line refusal;
    ``state_space`` says per layer whether it is a Mamba layer (a hybrid's), whose block has no attention."""
    if geometry.family not in MOE_ARCHITECTURES:
        why = UNEXPORTABLE_MOE.get(geometry.family, "its GGUF layout is not written")
        raise GqaPruneError(
            f"GGUF export of {geometry.family} mixtures of experts is refused: {why}; exportable: "
            f"{', '.join(MOE_ARCHITECTURES)} (ppl, evaluate and efficiency run the Hugging Face checkpoint)"
        )
    architecture, graph_renormalises, hidden_projections = MOE_ARCHITECTURES[geometry.family]
    shared = geometry.shared_widths or (0,) * geometry.num_layers
    mamba = state_space or (False,) * geometry.num_layers
    attention_layers = tuple(groups for groups, recurrent in zip(geometry.kv_groups, mamba) if not recurrent)
    shapes = {
        "experts": geometry.experts, "expert widths": geometry.widths, "KV heads": attention_layers,
        "shared-expert widths": shared,
    }  # fmt: skip
    for what, values in shapes.items():
        if len(set(values)) != 1 or (what != "shared-expert widths" and 0 in values):
            raise GqaPruneError(
                f"llama.cpp's {architecture} takes the same {what} in every layer, this model has {list(values)}; "
                "only uniform expert plans (plan --experts uniform, no layer or block removed) export to GGUF"
            )
    if renormalises != graph_renormalises:
        raise GqaPruneError(
            f"llama.cpp's {architecture} {'renormalises' if graph_renormalises else 'does not renormalise'} the "
            f"top-k gates, but this {geometry.family} model's router {'does' if renormalises else 'does not'} "
            "(norm_topk_prob); its GGUF would route differently, so it is not exported"
        )
    kv_heads = attention_layers[0]
    heads = kv_heads * geometry.heads_per_group
    rows = {"q": heads * geometry.head_dim, "k": kv_heads * geometry.head_dim}
    for projection in hidden_projections:
        if rows[projection] != hidden_size:
            raise GqaPruneError(
                f"llama.cpp's {architecture} builds {projection}_proj with as many rows as hidden dimensions "
                f"({hidden_size}), this model's has {rows[projection]}"
                + (" (GQA groups removed)" if projection == "q" else " (grouped-query attention)")
            )
    experts = Experts(geometry.experts[0], geometry.top_k, geometry.widths[0], shared[0])
    blocks = tuple(
        Block(layer, "none", "full", 0, 0, experts.width)
        if recurrent
        else Block(layer, "full", "full", heads, kv_heads, experts.width)
        for layer, recurrent in enumerate(mamba)
    )
    return Layout(architecture, blocks, experts)
