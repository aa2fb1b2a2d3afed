"""The scores value and its storage: per unit kind and per layer, with how they were made. No passes here.

``Scores`` holds what the importance stage measured: keep-scores for the units of every width kind (GQA
groups, MLP channels: higher = keep), structural scores per criterion for sublayers and layers
(``block_influence``, ``activation``, ``removal``: higher = more important), and per kind the measured
loss curve (calibration-loss increase against parameters removed) that the hybrid plan prices kinds by.
It is stored as ``units.safetensors`` (tensors) + ``scores.json`` (everything else);
folders written before the unit-kind registry (``groups.safetensors`` + ``layers.json``) still load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import Geometry
from .atomic import atomic_dir
from .errors import GqaPruneError
from .units import KINDS, WIDTH_KINDS

SCORES_FORMAT = "gqa-prune-scores"
SCORES_VERSION = 2
UNITS_FILE = "units.safetensors"
SCORES_FILE = "scores.json"
V1_GROUPS_FILE, V1_LAYERS_FILE = "groups.safetensors", "layers.json"
MASK_PREFIX = "mask."  # tensors of deterministic learned masks: mask.<kind>.<layer>
_V1_NAMES = {"attn_groups": "gqa_group", "mlp_channels": "mlp_channel"}


CURVE_DROP_TOLERANCE = 0.25  # measurement noise a removal curve may show (nats, and a fraction of its level)


@dataclass(frozen=True)
class LossCurve:
    """Measured calibration-loss increase of removing more and more of one kind: (parameters removed, nats).

    Between measured points the loss is interpolated on the lower convex hull (removals compound, so the
    price per parameter rises); beyond the last point the kind is not used.
    """

    points: tuple[tuple[int, float], ...]  # ascending parameters removed; (0, 0.0) implied

    @property
    def max_params(self) -> int:
        return self.points[-1][0] if self.points else 0

    def hull(self) -> list[tuple[int, float]]:
        """The lower convex hull of (0, 0) and the points (negative measurements count as 0)."""
        hull: list[tuple[int, float]] = [(0, 0.0)]
        for params, loss in self.points:
            point = (params, max(loss, 0.0))
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (point[0] - x1) >= (point[1] - y1) * (x2 - x1):  # hull[-1] lies above the chord
                    hull.pop()
                else:
                    break
            hull.append(point)
        return hull

    def loss(self, params: float) -> float:
        hull = self.hull()
        for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
            if params <= x2:
                return y1 + (y2 - y1) * (params - x1) / (x2 - x1)
        return float("inf")

    def check(self, where: str) -> None:
        """Trust a curve only when well-formed: finite losses at strictly ascending, positive parameter counts,
        rising with them up to measurement noise (a later point may lie at most ``CURVE_DROP_TOLERANCE`` nats,
        plus that fraction of the highest loss so far, below it). The first point may lie below 0: removing a unit
        can lower the calibration loss (the hull then prices it as free)."""
        params = [point[0] for point in self.points]
        if any(count <= 0 for count in params) or params != sorted(set(params)):
            raise GqaPruneError(f"{where}: parameter counts {params} must be positive and strictly ascending")
        highest = -math.inf
        for count, loss in self.points:
            if not math.isfinite(loss):
                raise GqaPruneError(f"{where}: loss {loss} at {count:,} parameters removed is not a finite number")
            if loss < highest - CURVE_DROP_TOLERANCE * (1 + max(highest, 0.0)):
                raise GqaPruneError(
                    f"{where}: loss {loss:.4g} at {count:,} parameters removed falls below the {highest:.4g} of a "
                    "smaller removal; a removal curve rises with what it removes"
                )
            highest = max(highest, loss)

    def to_dict(self) -> dict:
        return {"points": [list(point) for point in self.points]}

    @classmethod
    def from_dict(cls, data: dict) -> LossCurve:
        return cls(tuple((int(params), float(loss)) for params, loss in data["points"]))


@dataclass
class Scores:
    """Everything the importance stage produces for one model and one calibration set."""

    criterion: str  # the unit criterion of ``units``
    geometry: Geometry
    units: dict[str, list[torch.Tensor]]  # width kind -> per-layer keep-scores (float32, higher = keep)
    structural: dict[str, dict[str, list[float]]]  # criterion -> structural kind -> per-layer importance
    calibration_loss: float
    curves: dict[str, LossCurve] = field(default_factory=dict)  # kind -> measured loss curve
    info: dict = field(default_factory=dict)  # calibration metadata, blocks, batch size, seed, parameters
    # learned criteria (l0): every kind -> per-layer deterministic 0/1 masks (one value per unit); plans of
    # mode "learned" keep exactly the units whose mask is 1. Stored as ``mask.<kind>.<layer>`` tensors.
    masks: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def layer_scores(self) -> dict[str, list[float]]:
        """Per-layer importance of each structural criterion (what width plans unbalance rates by)."""
        return {name: per_kind["layer"] for name, per_kind in self.structural.items() if "layer" in per_kind}

    def of(self, kind: str) -> list[torch.Tensor]:
        return self.units[kind]

    def check_finite(self, where: str) -> None:
        """Refuse NaN/Inf anywhere and malformed loss curves: a plan built on them would be arbitrary."""
        for name, tensor in self._tensors().items():
            if not torch.isfinite(tensor).all():
                raise GqaPruneError(
                    f"{where}: scores {name} contain NaN/Inf (criterion {self.criterion}); "
                    "check weights and calibration data"
                )
        for criterion, per_kind in self.structural.items():
            for kind, values in per_kind.items():
                if not all(math.isfinite(value) for value in values):
                    raise GqaPruneError(
                        f"{where}: {criterion} scores of {kind} contain NaN/Inf; check weights and calibration data"
                    )
        for kind, curve in self.curves.items():
            curve.check(f"{where}: loss curve of {kind}")
        if not math.isfinite(self.calibration_loss):
            raise GqaPruneError(f"{where}: calibration loss is {self.calibration_loss}; the model output is not finite")

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"{kind}.{layer}": values.contiguous()
            for kind, per in self.units.items()
            for layer, values in enumerate(per)
        }
        tensors.update(
            {
                f"{MASK_PREFIX}{kind}.{layer}": values.float().contiguous()
                for kind, per in self.masks.items()
                for layer, values in enumerate(per)
            }
        )
        return tensors


def check_layers(scores: Scores, where: str) -> None:
    """Every per-layer list must have one entry per layer of the geometry (an edited or mixed folder fails)."""
    layers = scores.geometry.num_layers
    lists = [(f"{kind} scores", values) for kind, values in scores.units.items()]
    lists += [
        (f"{criterion} {kind}", values) for criterion, per in scores.structural.items() for kind, values in per.items()
    ]
    for name, values in lists:
        if len(values) != layers:
            raise GqaPruneError(f"{where}: {name} cover {len(values)} layers but the model has {layers}")
    for kind in WIDTH_KINDS:
        for layer, values in enumerate(scores.units.get(kind.name, [])):
            if len(values) != kind.count(scores.geometry, layer):
                raise GqaPruneError(
                    f"{where}: layer {layer} has {len(values)} {kind.name} scores but "
                    f"{kind.count(scores.geometry, layer)} units"
                )
    for kind_name, per_layer in scores.masks.items():
        if kind_name not in KINDS or len(per_layer) != layers:
            raise GqaPruneError(f"{where}: masks of {kind_name!r} do not match the model's unit kinds and layers")
        for layer, values in enumerate(per_layer):
            binary = bool(((values == 0) | (values == 1)).all())
            if len(values) != KINDS[kind_name].count(scores.geometry, layer) or not binary:
                raise GqaPruneError(
                    f"{where}: layer {layer} {kind_name} mask must hold one 0/1 value per unit "
                    f"({KINDS[kind_name].count(scores.geometry, layer)})"
                )


def save(scores: Scores, out_dir: str | os.PathLike) -> Path:
    """Write ``units.safetensors`` and ``scores.json`` into ``out_dir`` atomically (byte-reproducible)."""
    scores.check_finite("importance")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "importance") as temporary:
        write_files(scores, temporary)
    return out_dir


def write_files(scores: Scores, folder: Path) -> None:
    """Write the two files into an existing (temporary) folder; ``save`` wraps this atomically."""
    # one metadata key: safetensors writes several in a random order, and artefacts must be byte-reproducible
    metadata = {"gqa_prune": json.dumps({"criterion": scores.criterion, "format": SCORES_FORMAT}, sort_keys=True)}
    save_file(scores._tensors(), str(folder / UNITS_FILE), metadata=metadata)
    record = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "criterion": scores.criterion,
        "geometry": scores.geometry.to_dict(),
        "structural": scores.structural,
        "curves": {kind: curve.to_dict() for kind, curve in scores.curves.items()},
        "calibration_loss": scores.calibration_loss,
        "info": scores.info,
    }
    (folder / SCORES_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise GqaPruneError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GqaPruneError(f"{path}: not valid JSON ({error})") from error


def load(in_dir: str | os.PathLike) -> Scores:
    """Read an importance folder (current or version-1 layout), refusing missing files and non-finite scores."""
    in_dir = Path(in_dir)
    if (in_dir / SCORES_FILE).is_file() and (in_dir / UNITS_FILE).is_file():
        scores = _load_v2(in_dir)
    elif (in_dir / V1_GROUPS_FILE).is_file() and (in_dir / V1_LAYERS_FILE).is_file():
        scores = _load_v1(in_dir)
    else:
        raise GqaPruneError(
            f"importance folder {str(in_dir)!r} lacks {UNITS_FILE} and {SCORES_FILE} "
            "(write it with `gqa-prune importance`)"
        )
    check_layers(scores, str(in_dir))
    scores.check_finite(str(in_dir))
    return scores


def _split(
    tensors: dict[str, torch.Tensor], num_layers: int, allowed: set[str] | None = None
) -> dict[str, list[torch.Tensor]]:
    """'<kind>.<layer>' tensors -> kind -> per-layer list (``allowed``: the kinds that may appear)."""
    allowed = {width.name for width in WIDTH_KINDS} if allowed is None else allowed
    table: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        kind, _, layer = name.rpartition(".")
        if kind not in allowed or not layer.isdigit():
            raise GqaPruneError(f"unexpected tensor {name!r} in {UNITS_FILE}")
        table.setdefault(kind, {})[int(layer)] = tensor
    return {kind: [per_layer[i] for i in sorted(per_layer)] for kind, per_layer in table.items()}


def _load_v2(in_dir: Path) -> Scores:
    record = _read_json(in_dir / SCORES_FILE)
    if record.get("format") != SCORES_FORMAT or record.get("version") != SCORES_VERSION:
        raise GqaPruneError(f"{in_dir / SCORES_FILE}: not gqa-prune scores version {SCORES_VERSION}")
    try:
        geometry = Geometry.from_dict(record["geometry"])
        tensors = _read_tensors(in_dir / UNITS_FILE)
        masks = {name[len(MASK_PREFIX) :]: tensors.pop(name) for name in list(tensors) if name.startswith(MASK_PREFIX)}
        return Scores(
            criterion=record["criterion"],
            geometry=geometry,
            units=_split(tensors, geometry.num_layers),
            masks=_split(masks, geometry.num_layers, set(KINDS)) if masks else {},
            structural=record["structural"],
            calibration_loss=record["calibration_loss"],
            curves={kind: LossCurve.from_dict(curve) for kind, curve in record.get("curves", {}).items()},
            info=record.get("info", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise GqaPruneError(f"{in_dir / SCORES_FILE}: malformed scores ({error!r})") from error


def _load_v1(in_dir: Path) -> Scores:
    layers = _read_json(in_dir / V1_LAYERS_FILE)
    try:
        geometry = Geometry.from_dict(layers["geometry"])
        tensors = _read_tensors(in_dir / V1_GROUPS_FILE)
        units = {
            kind: [tensors[f"layers.{layer}.{old}"] for layer in range(geometry.num_layers)]
            for old, kind in _V1_NAMES.items()
        }
        return Scores(
            criterion=layers["criterion"],
            geometry=geometry,
            units=units,
            structural={name: {"layer": values} for name, values in layers["layer_scores"].items()},
            calibration_loss=layers["calibration_loss"],
            info=layers.get("info", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise GqaPruneError(f"{in_dir / V1_LAYERS_FILE}: malformed version-1 scores ({error!r})") from error
