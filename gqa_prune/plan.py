"""``PruningPlan``: per layer the kept KV groups and MLP channels, built from importance scores.

A plan is a value: it round-trips through JSON exactly, it is validated on construction (every layer keeps
at least one KV group and one MLP channel, indices sorted, unique and in range), and it predicts the
pruned parameter count. Kept query heads are implied: group g keeps query heads g*R .. g*R+R-1, so every
kept query head stays with its own KV head.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .allocation import STRATEGIES, check_rate_bounds, continuous_rates, discretize, layer_pressure, removal_options
from .arch import Geometry
from .atomic import write_text
from .errors import GqaPruneError
from .importance import ImportanceResult

PLAN_FORMAT = "gqa-prune-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanSettings:
    """How the plan was asked for. attn_ratio / mlp_ratio: fraction of that part's parameters to remove."""

    attn_ratio: float
    mlp_ratio: float
    strategy: str = "inverse"
    alpha: float = 1.0
    min_rate: float = 0.0
    max_rate: float = 0.8
    protected_layers: tuple[int, ...] = ()
    channel_multiple: int = 128
    layer_criterion: str = "block_influence"
    criterion: str = "taylor"  # the unit criterion of the scores the plan was built from

    def validate(self, num_layers: int) -> None:
        check_rate_bounds(self.attn_ratio, "attention ratio")
        check_rate_bounds(self.mlp_ratio, "MLP ratio")
        if self.strategy not in STRATEGIES:
            raise GqaPruneError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not (0.0 <= self.min_rate <= self.max_rate < 1.0):
            raise GqaPruneError(
                f"need 0 <= min_rate <= max_rate < 1, got min_rate={self.min_rate}, max_rate={self.max_rate}"
            )
        if not (self.alpha >= 0.0):
            raise GqaPruneError(f"alpha {self.alpha} must be >= 0 (0 = no contrast between layers)")
        if self.channel_multiple < 1:
            raise GqaPruneError(f"channel_multiple {self.channel_multiple} must be >= 1")
        outside = [layer for layer in self.protected_layers if not 0 <= layer < num_layers]
        if outside:
            raise GqaPruneError(f"protected layer {outside[0]} is outside 0..{num_layers - 1}")


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    importance: float
    attn_rate: float  # continuous target rate before rounding to whole units
    mlp_rate: float
    kept_kv_groups: tuple[int, ...]
    kept_mlp_channels: tuple[int, ...]


@dataclass(frozen=True)
class PruningPlan:
    geometry: Geometry  # the model the plan applies to
    settings: PlanSettings
    layers: tuple[LayerPlan, ...]
    params_before: int  # all parameters of that model (embeddings included, tied ones once)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Refuse plans that would empty a layer or index outside the model."""
        geometry = self.geometry
        if len(self.layers) != geometry.num_layers:
            raise GqaPruneError(f"plan has {len(self.layers)} layers but the model has {geometry.num_layers}")
        for index, layer in enumerate(self.layers):
            if layer.layer != index:
                raise GqaPruneError(f"plan layer entries must be in order: entry {index} is layer {layer.layer}")
            _check_kept(layer.kept_kv_groups, geometry.kv_groups[index], f"layer {index}: kept_kv_groups", "KV group")
            _check_kept(
                layer.kept_mlp_channels,
                geometry.intermediate_sizes[index],
                f"layer {index}: kept_mlp_channels",
                "MLP channel",
            )

    # ------------------------------------------------------------------------------------------ derived
    def pruned_geometry(self) -> Geometry:
        return replace(
            self.geometry,
            kv_groups=tuple(len(layer.kept_kv_groups) for layer in self.layers),
            intermediate_sizes=tuple(len(layer.kept_mlp_channels) for layer in self.layers),
        )

    @property
    def is_uniform(self) -> bool:
        """True when every layer ends with the same shape (a stock config can describe the model)."""
        pruned = self.pruned_geometry()
        return len(set(zip(pruned.kv_groups, pruned.intermediate_sizes))) == 1

    def param_summary(self) -> dict[str, int | float]:
        before, after = self.geometry, self.pruned_geometry()
        attention_before = sum(before.attention_params(i) for i in range(before.num_layers))
        attention_after = sum(after.attention_params(i) for i in range(after.num_layers))
        mlp_before = sum(before.mlp_params(i) for i in range(before.num_layers))
        mlp_after = sum(after.mlp_params(i) for i in range(after.num_layers))
        removed = attention_before - attention_after + mlp_before - mlp_after
        return {
            "params_before": self.params_before,
            "params_after": self.params_before - removed,
            "attention_params_before": attention_before,
            "attention_params_after": attention_after,
            "mlp_params_before": mlp_before,
            "mlp_params_after": mlp_after,
            "achieved_attn_ratio": 1 - attention_after / attention_before,
            "achieved_mlp_ratio": 1 - mlp_after / mlp_before,
            "achieved_ratio": removed / (attention_before + mlp_before),
        }

    @property
    def params_after(self) -> int:
        return int(self.param_summary()["params_after"])

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        settings = asdict(self.settings)
        settings["protected_layers"] = list(self.settings.protected_layers)
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "geometry": self.geometry.to_dict(),
            "settings": settings,
            "params_before": self.params_before,
            "summary": self.param_summary(),  # derived; checked against the layers on load
            "layers": [
                {
                    **asdict(layer),
                    "kept_kv_groups": list(layer.kept_kv_groups),
                    "kept_mlp_channels": list(layer.kept_mlp_channels),
                }
                for layer in self.layers
            ],
        }

    def to_json(self) -> str:
        """Pretty JSON with one compact line per layer (kept index lists can be long)."""
        data = self.to_dict()
        layers = data.pop("layers")
        head = json.dumps(data, indent=2, sort_keys=True)
        body = ",\n".join("    " + json.dumps(layer, sort_keys=True) for layer in layers)
        return head[:-2] + ',\n  "layers": [\n' + body + "\n  ]\n}\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise GqaPruneError(
                f"not a gqa-prune plan (format {data.get('format')!r}, version {data.get('version')!r}; "
                f"expected {PLAN_FORMAT!r} {PLAN_VERSION})"
            )
        settings = dict(data["settings"])
        settings["protected_layers"] = tuple(settings["protected_layers"])
        plan = cls(
            geometry=Geometry.from_dict(data["geometry"]),
            settings=PlanSettings(**settings),
            layers=tuple(
                LayerPlan(
                    **{
                        **layer,
                        "kept_kv_groups": tuple(layer["kept_kv_groups"]),
                        "kept_mlp_channels": tuple(layer["kept_mlp_channels"]),
                    }
                )
                for layer in data["layers"]
            ),
            params_before=data["params_before"],
        )
        if "summary" in data and data["summary"] != plan.param_summary():
            raise GqaPruneError(
                "plan summary does not match its kept indices (was the file edited?); rebuild it with `gqa-prune plan`"
            )
        return plan

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise GqaPruneError(f"plan file {str(path)!r} does not exist (write it with `gqa-prune plan`)")
        try:
            return cls.from_json(path.read_text())
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise GqaPruneError(f"plan file {str(path)!r} is malformed: {error}") from error


def _check_kept(kept: tuple[int, ...], size: int, where: str, unit: str) -> None:
    if not kept:
        raise GqaPruneError(f"{where} is empty: a plan must keep at least one {unit} in every layer")
    if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
        raise GqaPruneError(f"{where} must be sorted, unique indices in 0..{size - 1}")


def top_units(scores: torch.Tensor, keep: int) -> tuple[int, ...]:
    """Indices of the ``keep`` highest scores, ascending; ties keep the lower index."""
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return tuple(sorted(order[:keep]))


def build_plan(importance: ImportanceResult, settings: PlanSettings, params_before: int) -> PruningPlan:
    """Allocate removals across layers by layer importance, then keep each layer's top-scoring units."""
    geometry = importance.geometry
    settings.validate(geometry.num_layers)
    if settings.layer_criterion not in importance.layer_scores:
        have = ", ".join(sorted(importance.layer_scores)) or "none"
        raise GqaPruneError(
            f"layer criterion {settings.layer_criterion!r} was not computed by the importance stage (has: {have}); "
            "re-run importance with it in --layer-criteria"
        )
    layer_importance = importance.layer_scores[settings.layer_criterion]
    pressure = layer_pressure(layer_importance, settings.strategy, settings.alpha)
    prunable = [layer not in settings.protected_layers for layer in range(geometry.num_layers)]
    uniform = settings.strategy == "uniform"

    def allocate(
        units: tuple[int, ...], target: float, step: int, min_kept: int, what: str
    ) -> tuple[list[float], list[int]]:
        rates = continuous_rates(pressure, units, prunable, target, settings.min_rate, settings.max_rate, what)
        options = [
            removal_options(n, step, settings.max_rate * n if ok and target > 0 else 0, min_kept)
            for n, ok in zip(units, prunable)
        ]
        removed = discretize([rate * n for rate, n in zip(rates, units)], options, target * sum(units), uniform)
        return rates, removed

    attn_rates, groups_removed = allocate(geometry.kv_groups, settings.attn_ratio, 1, 1, "attention")
    mlp_rates, channels_removed = allocate(
        geometry.intermediate_sizes, settings.mlp_ratio, settings.channel_multiple, settings.channel_multiple, "MLP"
    )
    layers = tuple(
        LayerPlan(
            layer=index,
            importance=float(layer_importance[index]),
            attn_rate=attn_rates[index],
            mlp_rate=mlp_rates[index],
            kept_kv_groups=top_units(
                importance.units.attn_groups[index], geometry.kv_groups[index] - groups_removed[index]
            ),
            kept_mlp_channels=top_units(
                importance.units.mlp_channels[index], geometry.intermediate_sizes[index] - channels_removed[index]
            ),
        )
        for index in range(geometry.num_layers)
    )
    return PruningPlan(geometry=geometry, settings=settings, layers=layers, params_before=params_before)
