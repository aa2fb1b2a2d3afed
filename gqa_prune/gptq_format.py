"""The GPTQ checkpoint format as gqa-prune reads it: what a folder's safetensors headers say (projection
widths, storage bits per weight, without loading weights), and loading such a folder through GPTQModel's
kernels (which CPU kernel takes which settings is ``quant_settings.KERNELS``, importable without torch).

Below ``sources`` (which loads quantized folders with it) and ``quantize`` (which writes them): it imports
neither.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from ._quiet import import_quietly
from .arch import ALL_ROLES
from .errors import GqaPruneError, require
from .quant_settings import KERNELS, kernel_for
from .remote_code import trust_remote_code

PACKING_BACKEND = "gptq_torch"  # GPTQModel packs with this kernel whatever kernel later runs inference


def _decoder_linear_tensors(model_dir: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """Safetensors header entries of the decoder projections, grouped by layer name (no weights loaded)."""
    projections = {role.module for role in ALL_ROLES}
    layers: dict[str, dict[str, dict]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        header = _safetensors_header(file)
        header.pop("__metadata__", None)
        for name, info in header.items():
            layer, _, part = name.rpartition(".")
            if ".layers." in layer and layer.rpartition(".")[2] in projections:
                layers.setdefault(layer, {})[part] = info
    if not layers:
        raise GqaPruneError(f"no decoder projections (q/k/v/o, gate/up/down) found in {model_dir}")
    order = [role.module for role in ALL_ROLES]

    def natural(name: str) -> tuple[int, int]:  # layer index, then q, k, v, o, gate, up, down
        index = int(name.split(".layers.")[1].split(".")[0])
        return index, order.index(name.rpartition(".")[2])

    return {name: layers[name] for name in sorted(layers, key=natural)}


FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")  # [experts, ., .] tensors of a mixture of experts


def projection_in_features(model_dir: str | os.PathLike) -> dict[str, int]:
    """in_features of every decoder projection of an unquantized checkpoint, from the headers; a mixture of
    experts' fused expert tensors count as their per-expert projections (gate/up read the hidden size, down
    the expert width, whichever way the family lays them out)."""
    widths = {layer: parts["weight"]["shape"][1] for layer, parts in _decoder_linear_tensors(model_dir).items()}
    return {**widths, **_fused_expert_in_features(model_dir)}


def _fused_expert_in_features(model_dir: str | os.PathLike) -> dict[str, int]:
    shapes = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in _safetensors_header(file).items():
            if name.endswith(FUSED_EXPERTS) and len(info.get("shape", ())) == 3:
                shapes[name] = info["shape"][1:]
    widths = {}
    for name, down in shapes.items():
        if not name.endswith(FUSED_EXPERTS[1]):
            continue
        block = name.removesuffix(FUSED_EXPERTS[1])
        gate_up = shapes.get(block + FUSED_EXPERTS[0], down)
        hidden = (set(gate_up) & set(down) or set(down)).pop()  # the dimension both read or write
        width = down[1] if down[0] == hidden else down[0]
        widths[block + "experts.gate_up_proj"], widths[name] = hidden, width
    return widths


def _register_pruned_types() -> None:
    """GPTQModel picks its layer map by model_type: give the gqa_pruned_* types their family's map."""
    from gptqmodel.models import auto

    from .modeling_gqa_prune import PRUNED_CLASSES

    for family, (config_class, _) in PRUNED_CLASSES.items():
        if config_class.model_type not in auto.MODEL_MAP:
            auto.MODEL_MAP[config_class.model_type] = auto.MODEL_MAP[family]
            auto.SUPPORTED_MODELS.append(config_class.model_type)


def load_gptqmodel():
    """GPTQModel, imported without its banner and with gqa-prune's pruned model types registered."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    import_quietly("gptqmodel")  # its banner; require() then finds it imported, or names the extra
    gptqmodel = require("gptqmodel", "quantize", "quantization")
    _register_pruned_types()
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
    for parts in _decoder_linear_tensors(model_dir).values():
        if "qweight" in parts:
            weights += parts["g_idx"]["shape"][0] * parts["qweight"]["shape"][1]
            stored_bits += sum(
                _tensor_bits(parts[key]) for key in ("qweight", "qzeros", "scales", "g_idx") if key in parts
            )
        else:
            weights += parts["weight"]["shape"][0] * parts["weight"]["shape"][1]
            stored_bits += _tensor_bits(parts["weight"])
    return stored_bits / weights


def _tensor_bits(info: dict) -> int:
    count = 1
    for size in info["shape"]:
        count *= size
    return count * _DTYPE_BITS[info["dtype"]]
