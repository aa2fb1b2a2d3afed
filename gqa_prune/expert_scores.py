"""The expert scores value and its storage: per MoE layer and expert, the statistics of one calibration pass.

Stored as ``experts.safetensors`` (``<statistic>.<layer>`` float64 tensors; dense layers have no expert
statistics, state-space layers no ``group`` statistic) and ``experts.json`` (the expert geometry, calibration
loss, the per-layer loss curves and how the pass was run). A folder holding these is what ``gqa-prune
importance`` writes for a mixture-of-experts model; ``plan --expert-ratio`` reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .criteria.experts import CHANNEL_STAT, EXPERT_STATS, GRADIENT_STATS, GROUP_STAT, SHARED_STAT
from .errors import GqaPruneError
from .moe import SUBLAYERS, ExpertGeometry
from .scores import LossCurve

EXPERT_SCORES_FORMAT = "gqa-prune-expert-scores"
EXPERT_SCORES_VERSION = 1
EXPERT_TENSORS_FILE = "experts.safetensors"
EXPERT_SCORES_FILE = "experts.json"
LAYER_KIND = "layer"  # width_curves key: per decoder layer, removing it whole


@dataclass
class ExpertScores:
    """What the expert pass measured: per layer a [experts] float64 tensor for every statistic."""

    geometry: ExpertGeometry
    # statistic -> per decoder layer (empty where the MLP is dense): [experts] each, CHANNEL_STAT [experts, width],
    # GROUP_STAT [kv_groups] (empty without attention; absent from scores written before groups were recorded)
    stats: dict[str, list[torch.Tensor]]
    calibration_loss: float
    info: dict = field(default_factory=dict)
    curves: dict[int, LossCurve] = field(default_factory=dict)  # per MoE layer: removing its experts alone
    # GROUP_STAT / SHARED_STAT / CHANNEL_STAT -> per attention layer / shared MLP / MoE layer: removing its
    # lowest-scored groups / channels / channels of every expert;
    # LAYER_KIND -> per decoder layer: removing it whole (one point); SUBLAYERS names -> per layer: removing its
    # attention block / its MoE block (one point; attention only where the model has one attention type)
    width_curves: dict[str, dict[int, LossCurve]] = field(default_factory=dict)

    def layer_stats(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's per-expert statistics (the gradient ones where the pass recorded them)."""
        return {name: self.stats[name][layer] for name in (*EXPERT_STATS, *GRADIENT_STATS) if name in self.stats}

    @property
    def statistics(self) -> tuple[str, ...]:
        """The statistics these scores hold (group statistics only where the geometry records groups, gradient
        statistics only where the pass had a backward)."""
        return (*statistics_of(self.geometry), *(name for name in GRADIENT_STATS if name in self.stats))

    def check(self, where: str) -> None:
        """Statistics for every statistic and layer, sized by the geometry, finite and non-negative."""
        for name in self.statistics:
            per_layer = self.stats.get(name)
            if per_layer is None or len(per_layer) != self.geometry.num_layers:
                raise GqaPruneError(f"{where}: expert statistic {name!r} missing or not one per layer")
            for layer, tensor in enumerate(per_layer):
                experts, width = self.geometry.experts[layer], self.geometry.widths[layer]
                shape = (experts, width) if name == CHANNEL_STAT and experts else (experts,)
                if name in (GROUP_STAT, SHARED_STAT):
                    shape = ((self.geometry.kv_groups if name == GROUP_STAT else self.geometry.shared_widths)[layer],)
                if tuple(tensor.shape) != shape:
                    raise GqaPruneError(
                        f"{where}: {name} of layer {layer} has shape {tuple(tensor.shape)}, expected {shape}"
                    )
                if not torch.isfinite(tensor).all() or (tensor < 0).any():
                    raise GqaPruneError(f"{where}: {name} of layer {layer} is not finite and non-negative")
        for layer, curve in self.curves.items():
            if layer not in self.geometry.moe_layers:
                raise GqaPruneError(f"{where}: a loss curve of layer {layer}, which has no experts")
            curve.check(f"{where}: expert loss curve of layer {layer}")
        sizes = {
            GROUP_STAT: self.geometry.kv_groups,
            SHARED_STAT: self.geometry.shared_widths,
            CHANNEL_STAT: self.geometry.widths,
            LAYER_KIND: (1,) * self.geometry.num_layers,
            **{name: tuple(sizes[i] for sizes in self.geometry.sublayer_params) for i, name in enumerate(SUBLAYERS)},
        }
        for kind, per_layer in self.width_curves.items():
            if kind not in sizes:
                raise GqaPruneError(f"{where}: loss curves of unknown kind {kind!r} (known: {', '.join(sizes)})")
            for layer, curve in per_layer.items():
                if not 0 <= layer < len(sizes[kind]) or not sizes[kind][layer]:
                    raise GqaPruneError(f"{where}: a {kind} loss curve of layer {layer}, which has no {kind} units")
                curve.check(f"{where}: {kind} loss curve of layer {layer}")


def statistics_of(geometry: ExpertGeometry) -> tuple[str, ...]:
    """The statistics a pass over a model of this geometry records (group and shared-MLP statistics only where
    the geometry records them: scores written before they existed lack them)."""
    recorded = ((GROUP_STAT, geometry.kv_groups), (SHARED_STAT, geometry.shared_widths))
    return (*EXPERT_STATS, CHANNEL_STAT, *(name for name, sizes in recorded if sizes))


def is_expert_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / EXPERT_SCORES_FILE).is_file()


def save(scores: ExpertScores, out_dir: str | os.PathLike) -> Path:
    """Write ``experts.safetensors`` and ``experts.json`` into ``out_dir`` atomically (byte-reproducible)."""
    scores.check("importance")
    out_dir = Path(out_dir)
    tensors = {
        f"{name}.{layer}": tensor.contiguous()
        for name, per_layer in scores.stats.items()
        for layer, tensor in enumerate(per_layer)
        if len(tensor)
    }
    record = {
        "format": EXPERT_SCORES_FORMAT,
        "version": EXPERT_SCORES_VERSION,
        "geometry": scores.geometry.to_dict(),
        "calibration_loss": scores.calibration_loss,
        "info": scores.info,
        "curves": _curves_to_dict(scores.curves),
        "width_curves": {kind: _curves_to_dict(curves) for kind, curves in sorted(scores.width_curves.items())},
    }
    with atomic_dir(out_dir, "importance") as temporary:
        metadata = {"gqa_prune": json.dumps({"format": EXPERT_SCORES_FORMAT}, sort_keys=True)}
        save_file(tensors, str(temporary / EXPERT_TENSORS_FILE), metadata=metadata)
        (temporary / EXPERT_SCORES_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def load(in_dir: str | os.PathLike) -> ExpertScores:
    """Read an expert importance folder, refusing missing, foreign or malformed files."""
    from .scores import _read_json, _read_tensors

    in_dir = Path(in_dir)
    if not (in_dir / EXPERT_SCORES_FILE).is_file() or not (in_dir / EXPERT_TENSORS_FILE).is_file():
        raise GqaPruneError(
            f"importance folder {str(in_dir)!r} lacks {EXPERT_TENSORS_FILE} and {EXPERT_SCORES_FILE} "
            "(write it with `gqa-prune importance` on a mixture-of-experts model)"
        )
    record = _read_json(in_dir / EXPERT_SCORES_FILE)
    if not isinstance(record, dict) or record.get("format") != EXPERT_SCORES_FORMAT:
        raise GqaPruneError(f"{in_dir / EXPERT_SCORES_FILE}: not a gqa-prune expert scores file")
    geometry = ExpertGeometry.from_dict(record.get("geometry") or {})
    tensors = _read_tensors(in_dir / EXPERT_TENSORS_FILE)
    first = geometry.moe_layers[0] if geometry.moe_layers else 0
    stats = {
        name: [
            tensors.get(f"{name}.{layer}", torch.zeros(0, dtype=torch.float64)).double()
            for layer in range(geometry.num_layers)
        ]
        for name in statistics_of(geometry) + tuple(name for name in GRADIENT_STATS if f"{name}.{first}" in tensors)
    }
    try:
        curves = _curves_from_dict(record.get("curves", {}))
        width_curves = {
            kind: _curves_from_dict(per_layer) for kind, per_layer in record.get("width_curves", {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise GqaPruneError(f"{in_dir / EXPERT_SCORES_FILE}: malformed loss curves ({error!r})") from error
    calibration_loss = float(record.get("calibration_loss", float("nan")))
    scores = ExpertScores(geometry, stats, calibration_loss, record.get("info", {}), curves, width_curves)
    scores.check(str(in_dir))
    return scores


def _curves_to_dict(curves: dict[int, LossCurve]) -> dict[str, dict]:
    return {str(layer): curve.to_dict() for layer, curve in sorted(curves.items())}


def _curves_from_dict(data: dict) -> dict[int, LossCurve]:
    return {int(layer): LossCurve.from_dict(curve) for layer, curve in data.items()}
