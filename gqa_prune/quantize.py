"""INT4/INT8 weight quantization through GPTQModel: GPTQ (calibrated) and round-to-nearest (no calibration).

Mixtures of experts: GPTQModel de-fuses the experts into one quantized linear layer per expert projection, with
the layer maps of ``gptqmodel_layouts`` (GPTQModel's own, corrected for Qwen2-MoE and GraniteMoeHybrid, and
extended to the project's per-layer classes). Measured with gptqmodel 7.6 and transformers 5.23 on tiny models
of every supported family, uniform and per-layer plans: its generic ``torch`` kernel quantizes and runs them
all; its ``torch_int8`` kernel crashed (a segmentation fault) and ``torch_aten`` needs expert widths in
multiples of 16, so expert checkpoints take ``--kernel torch``. What GPTQModel wrote is checked against the
source afterwards: a projection left in float or an expert missing fails in one line and nothing is written.

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
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .atomic import atomic_dir
from .errors import GqaPruneError
from .gptq_format import (
    PACKING_BACKEND,
    linear_bits_per_parameter,
    load_gptqmodel,
    projection_in_features,
    unquantized_projections,
)
from .moe import is_moe_type
from .quant_settings import CpuKernel, QuantSettings
from .remote_code import trust_remote_code
from .sources import PROVENANCE_FILE, read_provenance, require_model_dir

logger = logging.getLogger(__name__)

MOE_KERNEL = "torch"  # the only GPTQModel CPU kernel that ran quantized experts here


def settings_for(model_dir: str | os.PathLike, settings: QuantSettings) -> QuantSettings:
    """The settings a model folder takes: ``--kernel auto`` means the torch kernel on a mixture of experts (the
    only one that ran quantized experts here); any other kernel there is refused in one line, before any work."""
    model_type = json.loads((require_model_dir(model_dir) / "config.json").read_text()).get("model_type")
    if not is_moe_type(model_type):
        return settings
    if settings.kernel == "auto":
        return replace(settings, kernel=MOE_KERNEL)
    if settings.resolved_kernel() != MOE_KERNEL:
        raise GqaPruneError(
            f"quantize: {str(model_dir)!r} is a mixture of experts ({model_type}): kernel "
            f"{settings.resolved_kernel()} does not run quantized experts here (torch_int8 crashed, torch_aten needs "
            f"expert widths in multiples of 16); use --kernel {MOE_KERNEL} (or auto)"
        )
    return settings


def check_settings(settings: QuantSettings, in_features: dict[str, int]) -> CpuKernel:
    """Refuse settings the kernel (``QuantSettings.validate``) or the shapes cannot take, naming the value and
    what would work."""
    kernel = settings.validate()
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


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QuantSettings,
    calibration: torch.Tensor | None,
    batch_size: int = 1,
) -> None:
    """Quantize the folder ``model_dir`` into ``out_dir`` (a GPTQ-format checkpoint; not atomic by itself)."""
    gptqmodel = load_gptqmodel()
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
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    logger.info("%s %d-bit, group size %d: %s", settings.method, settings.bits, settings.group_size, model_dir)
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


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QuantSettings,
    calibration: torch.Tensor | None,
    batch_size: int = 1,
) -> dict:
    """Check, quantize, and write ``out_dir`` atomically with provenance, model card and the plan (if any)."""
    settings = settings_for(model_dir, settings)
    kernel = check_settings(settings, projection_in_features(model_dir))
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with atomic_dir(out_dir, "quantize") as temporary:
        quantize(model_dir, temporary, settings, calibration, batch_size)
        left = unquantized_projections(model_dir, temporary)
        if left:
            raise GqaPruneError(
                f"quantize: GPTQModel did not quantize all of {str(model_dir)!r} ({len(left)} problems, first: "
                f"{left[0]}); nothing written"
            )
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
{_load_snippet(model_dir)}"""


def _load_snippet(model_dir: Path) -> str:
    """How the card says to load the checkpoint: a mixture of experts needs the layer maps it was quantized with."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if is_moe_type(model_type):
        return f"""A mixture of experts: GPTQModel loads it with the layer maps gqa-prune quantized it with
(`gqa_prune.gptqmodel_layouts`), and the kernel recorded in `{PROVENANCE_FILE}`:

```python
from gqa_prune.sources import load_model
model = load_model(path)
```
"""
    return """```python
from gptqmodel import GPTQModel
model = GPTQModel.load(path, trust_remote_code=True)
```
"""
