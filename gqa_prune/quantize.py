"""INT4/INT8 weight quantization through GPTQModel: GPTQ (calibrated) and round-to-nearest (no calibration).

Both write the GPTQ checkpoint format (packed int32 ``qweight``, ``qzeros``, fp16 ``scales``, ``g_idx``), so
either loads with the same kernels. Settings are checked against the chosen CPU kernel and the model's
shapes before any work: a group size must divide the ``in_features`` of every quantized linear layer
(SmolLM2's 576-wide projections take 64, not 128), and each kernel supports only some bit widths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ._quiet import import_quietly
from .arch import ALL_ROLES
from .errors import GqaPruneError, require

logger = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class CpuKernel:
    """What a GPTQModel CPU inference kernel accepts, as measured with gptqmodel 7.6 on torch 2.13."""

    backend: str  # gptqmodel BACKEND value
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    group_divides_in_features: bool
    note: str


KERNELS = {
    # ATen int4pack: the fast one; the op itself rejects group size 16 although the class lists it
    "torch_aten": CpuKernel("gptq_torch_aten", (4,), (32, 64, 128), True, "fast int4 CPU kernel"),
    "torch_int8": CpuKernel("gptq_torch_int8", (2, 4, 8), (16, 32, 64, 128), False, "int8 fused CPU kernel"),
    "torch": CpuKernel("gptq_torch", (2, 3, 4, 5, 6, 7, 8), (16, 32, 64, 128, 256, 512, 1024), False, "generic, slow"),
}
PACKING_BACKEND = "gptq_torch"  # GPTQModel packs with this kernel whatever kernel later runs inference


@dataclass(frozen=True)
class QuantSettings:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    kernel: str = "auto"  # CPU kernel for inference: auto picks torch_aten for 4 bits, torch_int8 for 8

    @property
    def id(self) -> str:
        """Readable, stable artefact id: gptq-w4g64, rtn-w8g64."""
        return f"{self.method}-w{self.bits}g{self.group_size}"

    def resolved_kernel(self) -> str:
        if self.kernel != "auto":
            return self.kernel
        return {4: "torch_aten", 8: "torch_int8"}.get(self.bits, "torch")


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


def projection_in_features(model_dir: str | os.PathLike) -> dict[str, int]:
    """in_features of every decoder projection of an unquantized checkpoint, from the headers."""
    return {layer: parts["weight"]["shape"][1] for layer, parts in _decoder_linear_tensors(model_dir).items()}


def check_settings(settings: QuantSettings, in_features: dict[str, int]) -> CpuKernel:
    """Refuse settings the kernel or the shapes cannot take, naming the value and what would work."""
    if settings.method not in METHODS:
        raise GqaPruneError(f"quantization method {settings.method!r} is not one of {', '.join(METHODS)}")
    name = settings.resolved_kernel()
    if name not in KERNELS:
        raise GqaPruneError(f"kernel {name!r} is not one of auto, {', '.join(KERNELS)}")
    kernel = KERNELS[name]
    if settings.bits not in kernel.bits:
        able = sorted(k for k, spec in KERNELS.items() if settings.bits in spec.bits)
        raise GqaPruneError(
            f"bits {settings.bits} is not supported by the {name} kernel (bits {', '.join(map(str, kernel.bits))}); "
            f"kernels with {settings.bits} bits: {', '.join(able) or 'none'}"
        )
    if settings.group_size not in kernel.group_sizes:
        raise GqaPruneError(
            f"group size {settings.group_size} is not supported by the {name} kernel "
            f"(group sizes {', '.join(map(str, kernel.group_sizes))})"
        )
    if settings.bits not in (2, 4, 8):  # GPTQ packs odd widths 32 weights at a time
        bad = {layer: width for layer, width in in_features.items() if width % 32}
        if bad:
            layer, width = next(iter(bad.items()))
            raise GqaPruneError(
                f"bits {settings.bits} packs 32 weights at a time, but {layer} has in_features {width} "
                f"({len(bad)} layers); use bits 2, 4 or 8, or keep widths in multiples of 32"
            )
    if kernel.group_divides_in_features:
        bad = {layer: width for layer, width in in_features.items() if width % settings.group_size}
        if bad:
            layer, width = next(iter(bad.items()))
            fitting = [size for size in kernel.group_sizes if all(w % size == 0 for w in in_features.values())]
            raise GqaPruneError(
                f"group size {settings.group_size} does not divide in_features {width} of {layer} "
                f"({len(bad)} layers); group sizes that divide every layer: {', '.join(map(str, fitting)) or 'none'}"
            )
    return kernel


def _register_pruned_types() -> None:
    """GPTQModel picks its layer map by model_type: give the gqa_pruned_* types their family's map."""
    from gptqmodel.models import auto

    from .modeling_gqa_prune import PRUNED_CLASSES

    for family, (config_class, _) in PRUNED_CLASSES.items():
        if config_class.model_type not in auto.MODEL_MAP:
            auto.MODEL_MAP[config_class.model_type] = auto.MODEL_MAP[family]
            auto.SUPPORTED_MODELS.append(config_class.model_type)


def _gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    import_quietly("gptqmodel")  # its banner; require() then finds it imported, or names the extra
    gptqmodel = require("gptqmodel", "quantize", "quantization")
    _register_pruned_types()
    return gptqmodel


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QuantSettings,
    calibration: torch.Tensor | None,
    batch_size: int = 1,
) -> None:
    """Quantize the folder ``model_dir`` into ``out_dir`` (a GPTQ-format checkpoint; not atomic by itself)."""
    gptqmodel = _gptqmodel()
    config_kwargs = {
        "bits": settings.bits,
        "group_size": settings.group_size,
        "desc_act": settings.desc_act,
        "sym": settings.sym,
        "offload_to_disk": False,
    }
    if settings.method == "rtn":
        config_kwargs["weight_only"] = "rtn"
        samples = None
    else:
        if calibration is None or not len(calibration):
            raise GqaPruneError("GPTQ needs calibration blocks (--calib)")
        samples = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration]
    from .sources import trust_remote_code

    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    remote = trust_remote_code(model_dir)
    with _working_directory(out_dir.parent):  # GPTQModel writes logs/*.log into the working directory
        model = gptqmodel.GPTQModel.load(
            str(model_dir), gptqmodel.QuantizeConfig(**config_kwargs), trust_remote_code=remote
        )
        model.quantize(samples, batch_size=batch_size, backend=gptqmodel.BACKEND(PACKING_BACKEND))
        model.save(str(out_dir))


@contextlib.contextmanager
def _working_directory(parent: Path):
    """Run in a scratch folder beside the output that is removed afterwards (with whatever a library left there)."""
    scratch = Path(tempfile.mkdtemp(prefix=".gqa-prune-scratch-", dir=parent))
    previous = os.getcwd()
    os.chdir(scratch)
    try:
        yield scratch
    finally:
        os.chdir(previous)
        shutil.rmtree(scratch, ignore_errors=True)


def is_quantized(model_dir: str | os.PathLike) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("quantization_config", {}).get("quant_method") == "gptq"


def load_quantized(model_dir: str | os.PathLike, device: torch.device, kernel: str | None = None) -> nn.Module:
    """Load a GPTQ-format checkpoint with GPTQModel's kernels; returns the underlying HF model."""
    gptqmodel = _gptqmodel()
    config = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    if device.type == "cpu":
        name = kernel or QuantSettings(bits=config["bits"], group_size=config["group_size"]).resolved_kernel()
        backend = gptqmodel.BACKEND(KERNELS[name].backend)
    else:
        backend = gptqmodel.BACKEND.AUTO
    from .sources import trust_remote_code

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


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QuantSettings,
    calibration: torch.Tensor | None,
    batch_size: int = 1,
) -> dict:
    """Check, quantize, and write ``out_dir`` atomically with provenance, model card and the plan (if any)."""
    from .atomic import atomic_dir
    from .sources import PROVENANCE_FILE, read_provenance

    kernel = check_settings(settings, projection_in_features(model_dir))
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with atomic_dir(out_dir) as temporary:
        quantize(model_dir, temporary, settings, calibration, batch_size)
        for name in ("pruning_plan.json",):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, temporary / name)
        record = read_provenance(model_dir)
        record["quantization"] = {
            **asdict(settings),
            "kernel": settings.resolved_kernel(),
            "calibration_blocks": 0 if calibration is None else int(calibration.shape[0]),
            "bits_per_parameter": linear_bits_per_parameter(temporary),
        }
        (temporary / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (temporary / "README.md").write_text(_quantized_card(model_dir, out_dir.name, record, kernel))
    return record


def _quantized_card(model_dir: Path, name: str, record: dict, kernel: CpuKernel) -> str:
    quantization = record["quantization"]
    method = "GPTQ" if quantization["method"] == "gptq" else "round-to-nearest (no calibration)"
    note = f"\nNote: {record['note']}.\n" if record.get("note") else ""
    return f"""---
library_name: gptqmodel
tags:
- gqa-prune
- gptq
---
# {name}

`{model_dir.name}` quantized to INT{quantization["bits"]} weights by {method} through GPTQModel: group size
{quantization["group_size"]}, {"symmetric" if quantization["sym"] else "asymmetric"},
desc_act {quantization["desc_act"]}.
Linear layers store {quantization["bits_per_parameter"]:.3f} bits per weight (scales, zeros and indices included).
Source: `{record.get("source", "?")}`. GPTQ checkpoint format; on CPU it runs with GPTQModel's
`{kernel.backend}` kernel ({kernel.note}).
{note}
```python
from gptqmodel import GPTQModel
model = GPTQModel.load(path, trust_remote_code=True)
```
"""
