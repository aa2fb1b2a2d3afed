"""The GPTQ checkpoint format as gqa-prune reads it: what a folder's safetensors headers say (projection
widths, storage bits per weight, without loading weights), and loading such a folder through GPTQModel's
kernels (which CPU kernel takes which settings is ``quant_settings.KERNELS``, importable without torch).

Below ``sources`` (which loads quantized folders with it) and ``quantize`` (which writes them): it imports
neither.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from ._quiet import import_quietly
from .arch import ALL_ROLES
from .errors import GqaPruneError, require
from .gptqmodel_layouts import register
from .quant_settings import KERNELS, kernel_for
from .remote_code import trust_remote_code

PACKING_BACKEND = "gptq_torch"  # GPTQModel packs with this kernel whatever kernel later runs inference


ROUTERS = ("gate", "router", "shared_expert_gate")  # decoder matrices GPTQ leaves in float: expert routers
# fused [experts, ., .] tensors of a mixture of experts: (gate and up, down) by name ending; Granite's stock names
FUSED_EXPERTS = (("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight"))
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_LAYER_EXPERT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")  # a per-expert module: layer, expert


def _decoder_matrices(model_dir: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """Header entries of what GPTQ quantizes, by module: every decoder layer's linear layer (a quantized one's
    qweight, scales, zeros, g_idx; a float one's 2-D weight) and fused expert tensors (3-D, keyed by tensor
    name); routers and a state-space layer's convolution are left out. No weights are loaded."""
    matrices: dict[str, dict[str, dict]] = {}
    for name, info in _headers(model_dir).items():
        module, _, part = name.rpartition(".")
        if not _LAYER.search(name) or "conv1d" in module:
            continue
        if len(info["shape"]) == 3:
            matrices[name] = {"fused": info}
        elif part in ("qweight", "qzeros", "scales", "g_idx") or (part == "weight" and len(info["shape"]) == 2):
            if module.rpartition(".")[2] not in ROUTERS and not module.endswith(".router.layer"):
                matrices.setdefault(module, {})[part] = info
    if not matrices:
        raise GqaPruneError(f"no decoder projections (q/k/v/o, gate/up/down) found in {model_dir}")
    order = [role.module for role in ALL_ROLES]

    def natural(module: str) -> tuple[int, int, str]:  # layer index, then q, k, v, o, gate, up, down, others
        last = module.rpartition(".")[2]
        return int(_LAYER.search(module)[1]), order.index(last) if last in order else len(order), module

    return {module: matrices[module] for module in sorted(matrices, key=natural)}


def projection_in_features(model_dir: str | os.PathLike) -> dict[str, int]:
    """in_features of every linear layer GPTQ quantizes in an unquantized checkpoint, from the headers; a
    mixture of experts' fused expert tensors count as their per-expert projections (gate/up read the hidden
    size, down the expert width, whichever way the family lays them out)."""
    matrices = _decoder_matrices(model_dir)
    widths = {module: parts["weight"]["shape"][1] for module, parts in matrices.items() if "weight" in parts}
    fused = {name: parts["fused"]["shape"][1:] for name, parts in matrices.items() if "fused" in parts}
    for gate_up_name, down_name in FUSED_EXPERTS:
        for name, down in fused.items():
            if not name.endswith(down_name):
                continue
            gate_up_key = name.removesuffix(down_name) + gate_up_name
            gate_up = fused.get(gate_up_key, down)
            hidden = (set(gate_up) & set(down) or set(down)).pop()  # the dimension both read or write
            widths[gate_up_key], widths[name] = hidden, down[1] if down[0] == hidden else down[0]
    return widths


def unquantized_projections(source_dir: str | os.PathLike, quantized_dir: str | os.PathLike) -> list[str]:
    """What GPTQModel should have quantized but did not, from the headers: every linear layer or fused expert
    tensor still in float in ``quantized_dir``, and every layer that has fewer quantized experts than the
    fused tensors of ``source_dir`` hold."""
    problems, quantized_experts = [], {}
    for module, parts in _decoder_matrices(quantized_dir).items():
        unquantized = parts.get("weight", parts.get("fused"))  # a quantized layer's float part is its scales
        if unquantized is not None and unquantized["dtype"] in _FLOAT_DTYPES:
            problems.append(f"{module} {unquantized['shape']} is still in float")
        if "qweight" in parts and (match := _LAYER_EXPERT.search(module)):
            quantized_experts.setdefault(match[1], set()).add(match[2])
    for name, parts in _decoder_matrices(source_dir).items():
        if "fused" in parts:
            experts, layer = parts["fused"]["shape"][0], _LAYER.search(name)[1]
            quantized = len(quantized_experts.get(layer, ()))
            if quantized != experts:
                problems.append(f"layer {layer} has {experts} experts but {quantized} were quantized")
    return list(dict.fromkeys(problems))


def _headers(model_dir: str | os.PathLike) -> dict[str, dict]:
    """Every tensor's header entry in a folder's safetensors files (no weights loaded)."""
    entries = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        header = _safetensors_header(file)
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


def load_gptqmodel():
    """GPTQModel, imported without its banner, with gqa-prune's layer maps (``gptqmodel_layouts``) registered."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    import_quietly("gptqmodel")  # its banner; require() then finds it imported, or names the extra
    gptqmodel = require("gptqmodel", "quantize", "quantization")
    from defuser.model_registry import MODEL_CONFIG  # installed with GPTQModel
    from gptqmodel.models import auto

    register(auto, MODEL_CONFIG)
    return gptqmodel


def is_quantized(model_dir: str | os.PathLike) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("quantization_config", {}).get("quant_method") == "gptq"


def load_quantized(model_dir: str | os.PathLike, device: torch.device, kernel: str | None = None) -> nn.Module:
    """Load a GPTQ-format checkpoint with GPTQModel's kernels; returns the underlying HF model."""
    gptqmodel = load_gptqmodel()
    config = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    if device.type == "cpu":
        backend = gptqmodel.BACKEND(KERNELS[kernel or kernel_for(config["bits"])].backend)
    else:
        backend = gptqmodel.BACKEND.AUTO
    wrapper = gptqmodel.GPTQModel.load(
        str(model_dir), backend=backend, device=str(device), trust_remote_code=trust_remote_code(model_dir)
    )
    return wrapper.model.eval()


def _safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            size = path.stat().st_size
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            raise ValueError(f"its tensors need {8 + length + max(ends):,} bytes but the file has {size:,}")
        return header
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as error:
        raise GqaPruneError(f"{path}: not a readable safetensors file ({error})") from error


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
}


def linear_bits_per_parameter(model_dir: str | os.PathLike) -> float:
    """Storage bits per weight of the decoder's linear layers, scales, zeros and indices included.

    Read from the safetensors headers only. A quantized layer counts qweight + qzeros + scales + g_idx over
    in x out weights (g_idx has one entry per input feature); an unquantized one counts its weight's dtype.
    """
    stored_bits, weights = 0, 0
    for parts in _decoder_matrices(model_dir).values():
        if "qweight" in parts:
            weights += parts["g_idx"]["shape"][0] * parts["qweight"]["shape"][1]
            stored_bits += sum(
                _tensor_bits(parts[key]) for key in ("qweight", "qzeros", "scales", "g_idx") if key in parts
            )
        else:
            (info,) = parts.values()  # a float weight or fused expert tensor
            weights += math.prod(info["shape"])
            stored_bits += _tensor_bits(info)
    return stored_bits / weights


def _tensor_bits(info: dict) -> int:
    return math.prod(info["shape"]) * _DTYPE_BITS[info["dtype"]]
