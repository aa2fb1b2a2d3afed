"""Write a gqa-prune checkpoint as one GGUF file that llama.cpp runs with the Hugging Face model's logits.

Float types (f32, f16, bf16) are written here with the ``gguf`` package; quantized types (q8_0 and the
K-quants) are made from a temporary f32 file by llama.cpp's own quantizer, so they are exactly what
``llama-quantize`` would write. The file records that gqa-prune wrote it (``gqa_prune.*`` keys), which
``gqa-prune ppl`` and ``efficiency`` check before they trust it.

Weights go in llama.cpp's layout: Q and K rows of each head are permuted from Hugging Face's rotate-half
RoPE to llama.cpp's interleaved one where the architecture uses it (llama, deci), 1-D tensors (norms,
biases) stay f32, a tied output head is not written twice, and RoPE frequency scaling (Llama-3.1's
``llama3``, ``linear``) becomes the ``rope_freqs`` factors, read from the model's own rotary embedding.
Mixtures of experts with uniform expert plans go to llama.cpp's native MoE architectures (``layout``): the
fused expert tensors as its ``*_exps`` tensors, shared experts, and GraniteMoeHybrid's Mamba-2 layers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from .. import __version__
from ..arch import ATTENTION_ROLES, MLP_ROLES, adapter_for, geometry_of
from ..atomic import MARKER, atomic_file, check_output
from ..choices import GGUF_TYPES
from ..errors import GqaPruneError
from ..gptq_format import is_quantized
from ..moe import attention_block, expert_geometry_of, moe_family_for
from ..sources import load_model, load_tokenizer, read_provenance, require_model_dir
from .gguf_file import MARKER_KEY
from .gguf_vocab import add_vocab
from .layout import HYBRID_ARCHITECTURE, OUTPUT_REQUIRED, Block, Layout, expert_layout_for, layout_for

logger = logging.getLogger(__name__)

KIND = "export-gguf"  # the sub-command named in the output's marker

FLOAT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
QUANTIZED_TYPES = {  # --type -> llama.cpp's file type (llama_ftype), made by its quantizer
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
_ROPE_TYPES = ("default", "linear", "llama3")  # frequency scalings llama.cpp's rope_freqs reproduces exactly
# llama.cpp architectures whose RoPE pairs adjacent dimensions (permuting q and k alike where a model has no
# RoPE, as Granite 4.0-H, changes no attention score)
_INTERLEAVED_ROPE = ("llama", "deci", HYBRID_ARCHITECTURE)


def check_gguf_type(name: str) -> str:
    if name not in GGUF_TYPES:
        raise GqaPruneError(f"GGUF type {name!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    return name


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_theta(config) -> float:
    """The RoPE base frequency (transformers 5 keeps it in ``rope_parameters``)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_frequency_factors(model: nn.Module, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (each dimension's frequency divisor), or None when RoPE is unscaled or absent
    (a GraniteMoeHybrid without position embeddings)."""
    config = model.config
    if getattr(model.get_submodule("model"), "rotary_emb", None) is None:
        return None
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise GqaPruneError(
            f"RoPE scaling {rope_type!r} cannot be exported to GGUF exactly; exportable: {', '.join(_ROPE_TYPES)}"
        )
    rotary = model.get_submodule("model.rotary_emb")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise GqaPruneError(f"RoPE scaling {rope_type!r} scales attention; llama.cpp's rope_freqs cannot carry that")
    base = 1.0 / rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (base / rotary.inv_freq.double()).float()
    return None if torch.allclose(factors, torch.ones_like(factors), rtol=0, atol=1e-6) else factors


def context_length(config) -> int:
    """Positions the GGUF declares: the model's, capped at a sliding window (llama.cpp runs full attention)."""
    positions = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and isinstance(window, int) and 0 < window < positions:
        logger.info(
            "sliding window %d < %d positions: the GGUF declares %d (exact within it)", window, positions, window
        )
        return window
    return positions


class _TensorSink:
    """Converts tensors to the file's float type (1-D ones stay f32) and adds them to the writer."""

    def __init__(self, writer: gguf.GGUFWriter, float_type: gguf.GGMLQuantizationType):
        self.writer, self.float_type = writer, float_type

    def add(self, name: str, tensor: torch.Tensor) -> None:
        array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
        if array.ndim == 1 or self.float_type == gguf.GGMLQuantizationType.F32:
            self.writer.add_tensor(name, array)
        elif self.float_type == gguf.GGMLQuantizationType.F16:
            self.writer.add_tensor(name, array.astype(np.float16))
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(array, self.float_type), raw_dtype=self.float_type)


def add_attention_tensors(
    sink: _TensorSink, prefix: str, attention: nn.Module, norm: nn.Module, block: Block, interleave: bool
) -> None:
    """A block's attention norm, q/k/v/o weights and biases (q and k rows interleaved for llama.cpp's RoPE
    where ``interleave``), and Qwen3's / OLMoE's q and k norms."""
    sink.add(f"{prefix}.attn_norm.weight", norm.weight)
    heads = {"q_proj": block.head_count, "k_proj": block.head_count_kv}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for role in ATTENTION_ROLES:
        projection = getattr(attention, role.module)
        for kind in ("weight", "bias"):
            tensor = getattr(projection, kind)
            if tensor is None:
                continue
            if interleave and role.module in heads:
                tensor = _interleave_rope_rows(tensor, heads[role.module])
            sink.add(f"{prefix}.{names[role.module]}.{kind}", tensor)
    for norm_name, name in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
        if getattr(attention, norm_name, None) is not None:
            sink.add(f"{prefix}.{name}.weight", getattr(attention, norm_name).weight)


def _add_block_tensors(sink: _TensorSink, model: nn.Module, layout: Layout, block_index: int, block: Block) -> None:
    adapter = adapter_for(model.config)
    layer = adapter.decoder_layers(model)[block.layer]
    hidden = int(model.config.hidden_size)
    prefix = f"blk.{block_index}"
    interleave = layout.architecture in _INTERLEAVED_ROPE
    if block.attention == "full":
        norm = getattr(layer, adapter.norm_attr("attn"))
        add_attention_tensors(sink, prefix, adapter.sublayer(layer, "attn"), norm, block, interleave)
    elif block.attention == "zero":
        sink.add(f"{prefix}.attn_norm.weight", torch.ones(hidden))
        sink.add(f"{prefix}.attn_output.weight", torch.zeros(hidden, hidden))
    if block.mlp == "full":
        mlp = adapter.sublayer(layer, "mlp")
        sink.add(f"{prefix}.ffn_norm.weight", getattr(layer, adapter.norm_attr("mlp")).weight)
        names = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
        for role in MLP_ROLES:
            projection = getattr(mlp, role.module)
            sink.add(f"{prefix}.{names[role.module]}.weight", projection.weight)
            if projection.bias is not None:
                sink.add(f"{prefix}.{names[role.module]}.bias", projection.bias)
    else:
        width = block.feed_forward_length
        sink.add(f"{prefix}.ffn_norm.weight", torch.ones(hidden))
        sink.add(f"{prefix}.ffn_gate.weight", torch.zeros(width, hidden))
        sink.add(f"{prefix}.ffn_up.weight", torch.zeros(width, hidden))
        sink.add(f"{prefix}.ffn_down.weight", torch.zeros(hidden, width))


def _add_expert_block_tensors(sink: _TensorSink, model: nn.Module, layout: Layout, block: Block) -> None:
    """One block of a mixture of experts: attention, then the router, the experts' fused [E, ., .] tensors as
    llama.cpp's ``*_exps`` (gate and up split) and any shared expert with its sigmoid gate."""
    family = moe_family_for(model.config)
    layer = family.decoder_layers(model)[block.layer]
    prefix = f"blk.{block.layer}"
    interleave = layout.architecture in _INTERLEAVED_ROPE
    if block.attention == "full":
        add_attention_tensors(sink, prefix, attention_block(layer), layer.input_layernorm, block, interleave)
    else:
        sink.add(f"{prefix}.attn_norm.weight", layer.input_layernorm.weight)
        _add_mamba_tensors(sink, prefix, layer.mamba)
    sink.add(f"{prefix}.ffn_norm.weight", layer.post_attention_layernorm.weight)
    sparse = family.sparse_block(layer)
    sink.add(f"{prefix}.ffn_gate_inp.weight", family.router(sparse).weight)
    gate, up = sparse.experts.gate_up_proj.chunk(2, dim=1)  # [E, 2I, H]: the I gate rows, then the I up rows
    sink.add(f"{prefix}.ffn_gate_exps.weight", gate)
    sink.add(f"{prefix}.ffn_up_exps.weight", up)
    sink.add(f"{prefix}.ffn_down_exps.weight", sparse.experts.down_proj)  # [E, H, I]
    if layout.experts.shared_width:
        shared_mlp = family.shared_mlp
        shared = shared_mlp.module(layer)
        inputs = [linear.weight for linear in shared_mlp.inputs(shared)]
        gate, up = inputs[0].chunk(2, dim=0) if shared_mlp.fused else inputs  # fused: the gate rows, then the up rows
        if not shared_mlp.fused:  # Qwen2-MoE's shared expert has its own sigmoid gate
            sink.add(f"{prefix}.ffn_gate_inp_shexp.weight", sparse.shared_expert_gate.weight.flatten())
        down = shared_mlp.output(shared).weight
        for name, tensor in (("ffn_gate_shexp", gate), ("ffn_up_shexp", up), ("ffn_down_shexp", down)):
            sink.add(f"{prefix}.{name}.weight", tensor)


def _add_mamba_tensors(sink: _TensorSink, prefix: str, mamba: nn.Module) -> None:
    """A Mamba-2 mixer in llama.cpp's layout: A as -exp(A_log), A and D as [heads, 1], the convolution without
    its channel axis, the gated norm's weight per group."""
    sink.add(f"{prefix}.ssm_in.weight", mamba.in_proj.weight)
    sink.add(f"{prefix}.ssm_conv1d.weight", mamba.conv1d.weight.squeeze(1))
    if mamba.conv1d.bias is not None:
        sink.add(f"{prefix}.ssm_conv1d.bias", mamba.conv1d.bias)
    sink.add(f"{prefix}.ssm_dt.bias", mamba.dt_bias)
    sink.add(f"{prefix}.ssm_a", -torch.exp(mamba.A_log.float()).unsqueeze(1))
    sink.add(f"{prefix}.ssm_d", mamba.D.unsqueeze(1))
    sink.add(f"{prefix}.ssm_norm.weight", mamba.norm.weight.reshape(mamba.n_groups, -1))
    sink.add(f"{prefix}.ssm_out.weight", mamba.out_proj.weight)


def _add_hybrid_keys(writer: gguf.GGUFWriter, config) -> None:
    """GraniteMoeHybrid's Mamba-2 sizes, its multipliers, and whether its attention uses RoPE (llama.cpp reads
    rope_scaling.finetuned as that switch for granitehybrid)."""
    writer.add_ssm_conv_kernel(int(config.mamba_d_conv))
    writer.add_ssm_state_size(int(config.mamba_d_state))
    writer.add_ssm_group_count(int(config.mamba_n_groups))
    writer.add_ssm_inner_size(int(config.mamba_expand) * int(config.hidden_size))
    writer.add_ssm_time_step_rank(int(config.mamba_n_heads))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))
    writer.add_rope_scaling_finetuned(config.position_embedding_type == "rope")


def _layout_of(model: nn.Module) -> tuple[Layout, int, int]:
    """The model's layout, hidden size and head_dim (a mixture of experts reads them from its experts)."""
    family = moe_family_for(model.config)
    if family is None:
        geometry = geometry_of(model)
        return layout_for(geometry), geometry.hidden_size, geometry.head_dim
    geometry = expert_geometry_of(model)
    hidden_size = int(model.config.hidden_size)
    layers = family.decoder_layers(model)
    state_space = tuple(family.state_space and getattr(layer, "mamba", None) is not None for layer in layers)
    layout = expert_layout_for(geometry, hidden_size, family.routing(model.config).renormalize, state_space)
    return layout, hidden_size, geometry.head_dim


def write_gguf(model: nn.Module, tokenizer, path: Path, float_type: str, metadata: dict[str, str]) -> Layout:
    """Write ``model`` (in memory, float) with its tokenizer as a float GGUF at ``path``; returns its layout."""
    config = model.config
    layout, hidden_size, head_dim = _layout_of(model)
    tensor_type, file_type = FLOAT_TYPES[float_type]
    rope_factors = rope_frequency_factors(model, head_dim)
    writer = gguf.GGUFWriter(str(path), layout.architecture)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(metadata.get("name", "gqa-prune model"))
    for key, value in metadata.items():
        if key != "name":
            writer.add_string(f"gqa_prune.{key}", value)
    writer.add_string(MARKER_KEY, __version__)
    writer.add_string(MARKER, KIND)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(len(layout.blocks))
    writer.add_feed_forward_length(layout.per_layer("feed_forward_length"))
    heads = layout.per_layer("head_count")  # granitehybrid: one count (its Mamba layers say 0 KV heads)
    writer.add_head_count(max(heads) if layout.architecture == HYBRID_ARCHITECTURE else heads)
    writer.add_head_count_kv(layout.per_layer("head_count_kv"))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if layout.experts is not None:
        writer.add_expert_count(layout.experts.count)
        writer.add_expert_used_count(layout.experts.used)
        writer.add_expert_feed_forward_length(layout.experts.width)
        if layout.experts.shared_width:
            writer.add_expert_shared_feed_forward_length(layout.experts.shared_width)
    if layout.architecture == HYBRID_ARCHITECTURE:
        _add_hybrid_keys(writer, config)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    vocab_size = model.get_input_embeddings().num_embeddings
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(file_type)
    add_vocab(writer, tokenizer, vocab_size)

    sink = _TensorSink(writer, tensor_type)
    sink.add("token_embd.weight", model.get_input_embeddings().weight)
    sink.add("output_norm.weight", model.get_submodule("model.norm").weight)
    output = model.get_output_embeddings()
    tied = output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not tied or layout.architecture in OUTPUT_REQUIRED:  # these llama.cpp graphs have no tied output head
        sink.add("output.weight", output.weight)
    if rope_factors is not None:
        sink.add("rope_freqs.weight", rope_factors)
    for block_index, block in enumerate(layout.blocks):
        if layout.experts is None:
            _add_block_tensors(sink, model, layout, block_index, block)
        else:
            _add_expert_block_tensors(sink, model, layout, block)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return layout


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f16") -> dict:
    """Export a gqa-prune (or plain Hugging Face) model folder to one GGUF file, atomically; returns a summary."""
    check_gguf_type(gguf_type)
    if Path(out).suffix != ".gguf":
        raise GqaPruneError(f"output {str(out)!r} must end in .gguf (ppl and efficiency recognise GGUF files by it)")
    folder = require_model_dir(model_dir)
    check_output(out, is_dir=False, kind=KIND)  # before the work, not after it
    if is_quantized(folder):
        raise GqaPruneError(
            f"model folder {str(folder)!r} is a GPTQ checkpoint; export the float model it was quantized from "
            "(GGUF types q8_0/q4_k_m/... quantize it with llama.cpp)"
        )
    if gguf_type in QUANTIZED_TYPES:
        from .llama_cpp import require_llama_cpp

        require_llama_cpp()  # before the work, not after it
    model = load_model(folder, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(folder)
    metadata = {
        "name": folder.name,
        "source": str(read_provenance(folder).get("source", folder)),
        "model_folder": str(folder.resolve()),
        "type": gguf_type,
    }
    with atomic_file(out, KIND) as temporary:
        if gguf_type in FLOAT_TYPES:
            layout = write_gguf(model, tokenizer, temporary, gguf_type, metadata)
        else:
            from .llama_cpp import quantize

            # named like atomic's siblings, so that a later run removes one a killed process left behind
            scratch_prefix = f".{Path(out).name}.tmp-{os.getpid()}-f32-"
            with tempfile.TemporaryDirectory(prefix=scratch_prefix, dir=temporary.parent) as scratch:
                float_file = Path(scratch) / "model-f32.gguf"
                layout = write_gguf(model, tokenizer, float_file, "f32", metadata)
                del model
                quantize(float_file, temporary, QUANTIZED_TYPES[gguf_type])
    summary = {
        "architecture": layout.architecture,
        "blocks": len(layout.blocks),
        "type": gguf_type,
        "bytes": Path(out).stat().st_size,
    }
    logger.info("exported %s (%s, %s) -> %s", folder, layout.architecture, gguf_type, out)
    return summary
