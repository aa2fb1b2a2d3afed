"""``PruningPlan``: per layer what stays (kept units of each width kind) and what goes (whole sublayers or the
layer), built from importance scores in one of three modes.

- ``width``: every layer keeps its sublayers and loses GQA groups and MLP channels; the attention and MLP
  ratios are set (by default both equal the ratio) and layer importance unbalances them across layers.
- ``depth``: whole layers go, least important first (ShortGPT with ``block_influence``).
- ``hybrid``: layers, sublayers, GQA groups and MLP channels compete in one currency, the estimated
  calibration-loss increase per parameter removed (estimates calibrated per kind against measured losses);
  the attention/MLP split falls out of the scores.
- ``learned``: exactly the units whose learned hard-concrete mask is 1 (criterion ``l0``, ``learn-masks``),
  at the size the masks were learned for.

A plan is a value: it round-trips through JSON exactly, it is validated on construction (indices are
integers, sorted, unique and in range; a layer that keeps a sublayer keeps at least one of its units; some
layer keeps attention and some an MLP), and it predicts the pruned parameter count. Kept query heads are
implied: group g keeps query heads g*R .. g*R+R-1, so every kept query head stays with its own KV head.
Version-1 plans (width only) still load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .allocation import (
    continuous_rates,
    discretize,
    layer_pressure,
    removal_options,
    split_by_curves,
)
from .arch import Geometry
from .atomic import MARKER, write_text
from .errors import GqaPruneError
from .scores import Scores
from .settings import PlanSettings
from .units import GQA_GROUP, KINDS, MLP_CHANNEL, STRUCTURAL_KINDS, SUBLAYER_KINDS, WIDTH_KINDS

logger = logging.getLogger(__name__)

PLAN_FORMAT = "gqa-prune-plan"
PLAN_VERSION = 2
PLAN_KIND = "plan"  # the sub-command named in a plan file's output marker


@dataclass(frozen=True)
class Removal:
    """Why something went: the kind, how many units, and the score that decided it."""

    kind: str
    units: int
    score: float  # the deciding value: layer importance (depth), estimated loss in nats (hybrid), rate (width)
    basis: str  # what ``score`` is

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    importance: float
    kept: Mapping[str, tuple[int, ...]]  # width kind -> kept units (empty where the sublayer goes)
    removed: tuple[str, ...] = ()  # structural kinds removed here: "layer", "attn_sublayer", "mlp_sublayer"
    rates: Mapping[str, float] = field(default_factory=dict)  # width kind -> continuous target rate (width mode)
    reasons: tuple[Removal, ...] = ()

    @property
    def kept_kv_groups(self) -> tuple[int, ...]:
        return self.kept.get(GQA_GROUP.name, ())

    @property
    def kept_mlp_channels(self) -> tuple[int, ...]:
        return self.kept.get(MLP_CHANNEL.name, ())

    @property
    def attn_rate(self) -> float:
        return self.rates.get(GQA_GROUP.name, 0.0)

    @property
    def mlp_rate(self) -> float:
        return self.rates.get(MLP_CHANNEL.name, 0.0)

    @property
    def removes_layer(self) -> bool:
        return "layer" in self.removed or {"attn_sublayer", "mlp_sublayer"} <= set(self.removed)

    def keeps(self, scope: str) -> bool:
        """Whether the attention ("attn") or MLP ("mlp") sublayer stays."""
        return not self.removes_layer and SUBLAYER_KINDS[scope].name not in self.removed

    def removed_units(self, geometry: Geometry) -> dict[str, list[int]]:
        """Kind -> unit indices this layer loses (a whole sublayer or layer is unit 0 of its kind)."""
        if self.removes_layer:
            return {"layer": [0]}
        removed = {kind: [0] for kind in self.removed}
        for kind in (GQA_GROUP, MLP_CHANNEL):
            if self.keeps(kind.scopes[0]):
                gone = sorted(set(range(kind.count(geometry, self.layer))) - set(self.kept[kind.name]))
                if gone:
                    removed[kind.name] = gone
        return removed

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "importance": self.importance,
            "kept": {kind: list(units) for kind, units in self.kept.items()},
            "removed": list(self.removed),
            "rates": dict(self.rates),
            "reasons": [reason.to_dict() for reason in self.reasons],
        }

    @classmethod
    def from_dict(cls, data: dict, version: int) -> LayerPlan:
        if version == 1:
            kept = {GQA_GROUP.name: data["kept_kv_groups"], MLP_CHANNEL.name: data["kept_mlp_channels"]}
            rates = {GQA_GROUP.name: data["attn_rate"], MLP_CHANNEL.name: data["mlp_rate"]}
            return cls(data["layer"], data["importance"], _kept(kept), (), rates, ())
        return cls(
            layer=data["layer"],
            importance=data["importance"],
            kept=_kept(data["kept"]),
            removed=tuple(data.get("removed", ())),
            rates=dict(data.get("rates", {})),
            reasons=tuple(Removal(**reason) for reason in data.get("reasons", ())),
        )


def _kept(kept: Mapping) -> dict[str, tuple[int, ...]]:
    if not isinstance(kept, Mapping):
        raise GqaPruneError(f"kept must map unit kinds to index lists, got {type(kept).__name__}")
    return {kind: tuple(units) if isinstance(units, (list, tuple)) else units for kind, units in kept.items()}


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
        """Refuse plans that would empty a sublayer that stays, index outside the model, or use non-integers."""
        geometry = self.geometry
        if len(self.layers) != geometry.num_layers:
            raise GqaPruneError(f"plan has {len(self.layers)} layers but the model has {geometry.num_layers}")
        for index, layer in enumerate(self.layers):
            if layer.layer != index:
                raise GqaPruneError(f"plan layer entries must be in order: entry {index} is layer {layer.layer}")
            unknown = [kind for kind in layer.removed if kind not in {k.name for k in STRUCTURAL_KINDS}]
            if unknown:
                raise GqaPruneError(
                    f"layer {index}: cannot remove {unknown[0]!r}; "
                    f"removable: {', '.join(k.name for k in STRUCTURAL_KINDS)}"
                )
            unknown = [kind for kind in layer.kept if kind not in {k.name for k in WIDTH_KINDS}]
            if unknown:
                raise GqaPruneError(f"layer {index}: unknown unit kind {unknown[0]!r} in kept")
            for kind in WIDTH_KINDS:
                where = f"layer {index}: kept {kind.name}"
                kept = layer.kept.get(kind.name, ())
                if layer.keeps(kind.scopes[0]):
                    _check_kept(kept, kind.count(geometry, index), where, kind.description)
                elif kept:
                    raise GqaPruneError(f"{where} must be empty: the plan removes that sublayer")
        for scope, name in (("attn", "attention"), ("mlp", "MLP")):
            if not any(layer.keeps(scope) for layer in self.layers):
                raise GqaPruneError(f"the plan removes every {name} sublayer; at least one layer must keep its {name}")

    # ------------------------------------------------------------------------------------------ derived
    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(layer.layer for layer in self.layers if not layer.removes_layer)

    def pruned_geometry(self) -> Geometry:
        kept = [self.layers[index] for index in self.kept_layers]
        return replace(
            self.geometry,
            kv_groups=tuple(len(layer.kept_kv_groups) if layer.keeps("attn") else 0 for layer in kept),
            intermediate_sizes=tuple(len(layer.kept_mlp_channels) if layer.keeps("mlp") else 0 for layer in kept),
        )

    @property
    def has_removed_sublayers(self) -> bool:
        """Some remaining layer lacks its attention or its MLP (needs the project's model class)."""
        return any(not (layer.keeps("attn") and layer.keeps("mlp")) for layer in self.layers if not layer.removes_layer)

    @property
    def is_uniform(self) -> bool:
        """True when every remaining layer is whole and of the same shape (a stock config describes the model)."""
        pruned = self.pruned_geometry()
        return not self.has_removed_sublayers and len(set(zip(pruned.kv_groups, pruned.intermediate_sizes))) == 1

    def param_summary(self) -> dict[str, int | float]:
        before = self.geometry
        attention_before = sum(before.attention_params(i) for i in range(before.num_layers))
        mlp_before = sum(before.mlp_params(i) for i in range(before.num_layers))
        attention_after = mlp_after = fixed_removed = 0
        for index, layer in enumerate(self.layers):
            for scope in ("attn", "mlp"):
                if layer.keeps(scope):
                    kind = GQA_GROUP if scope == "attn" else MLP_CHANNEL
                    params = len(layer.kept.get(kind.name, ())) * kind.params_per_unit(before, index)
                    if scope == "attn":
                        attention_after += params
                    else:
                        mlp_after += params
                elif before.sublayer_params(index, scope):
                    fixed_removed += before.attn_fixed_params if scope == "attn" else before.mlp_fixed_params
        removed = attention_before - attention_after + mlp_before - mlp_after
        return {
            "params_before": self.params_before,
            "params_after": self.params_before - removed - fixed_removed,
            "attention_params_before": attention_before,
            "attention_params_after": attention_after,
            "mlp_params_before": mlp_before,
            "mlp_params_after": mlp_after,
            "achieved_attn_ratio": 1 - attention_after / attention_before,
            "achieved_mlp_ratio": 1 - mlp_after / mlp_before,
            "achieved_ratio": removed / (attention_before + mlp_before),
            "layers_removed": sum(layer.removes_layer for layer in self.layers),
            "attn_sublayers_removed": sum(not layer.keeps("attn") and not layer.removes_layer for layer in self.layers),
            "mlp_sublayers_removed": sum(not layer.keeps("mlp") and not layer.removes_layer for layer in self.layers),
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
            "layers": [layer.to_dict() for layer in self.layers],
            MARKER: PLAN_KIND,  # the output of `gqa-prune plan` (atomic's marker)
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
        version = data.get("version")
        if data.get("format") != PLAN_FORMAT or version not in (1, PLAN_VERSION):
            raise GqaPruneError(
                f"not a gqa-prune plan (format {data.get('format')!r}, version {version!r}; "
                f"expected {PLAN_FORMAT!r} 1 or {PLAN_VERSION})"
            )
        settings = dict(data["settings"])
        settings["protected_layers"] = tuple(settings["protected_layers"])
        if version == 1:  # width plans with both ratios set
            settings.setdefault("mode", "width")
        plan = cls(
            geometry=Geometry.from_dict(data["geometry"]),
            settings=PlanSettings(**settings),
            layers=tuple(LayerPlan.from_dict(layer, version) for layer in data["layers"]),
            params_before=data["params_before"],
        )
        summary = plan.param_summary()
        stored = data.get("summary")
        if stored is not None and any(stored.get(key) != value for key, value in summary.items() if key in stored):
            raise GqaPruneError(
                "plan summary does not match its kept indices (was the file edited?); rebuild it with `gqa-prune plan`"
            )
        return plan

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json(), PLAN_KIND)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise GqaPruneError(f"plan file {str(path)!r} does not exist (write it with `gqa-prune plan`)")
        try:
            return cls.from_json(path.read_text())
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            if isinstance(error, GqaPruneError):
                raise
            raise GqaPruneError(f"plan file {str(path)!r} is malformed: {error}") from error


def _check_kept(kept, size: int, where: str, unit: str) -> None:
    if not isinstance(kept, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise GqaPruneError(
            f"{where} must be a list of integer indices, got {list(kept) if isinstance(kept, tuple) else kept!r}"
        )
    if not kept:
        raise GqaPruneError(f"{where} is empty: a layer that keeps this sublayer must keep at least one {unit}")
    if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
        raise GqaPruneError(f"{where} must be sorted, unique indices in 0..{size - 1}")


def top_units(scores: torch.Tensor, keep: int) -> tuple[int, ...]:
    """Indices of the ``keep`` highest scores, ascending; ties keep the lower index."""
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return tuple(sorted(order[:keep]))


# ---------------------------------------------------------------------------------------------- building
def build_plan(scores: Scores, settings: PlanSettings, params_before: int | None = None) -> PruningPlan:
    """Build a plan of ``settings.mode`` from importance scores."""
    geometry = scores.geometry
    settings.validate(geometry.num_layers)
    scores.check_finite("plan")  # scores built in memory are held to what a loaded folder is
    if settings.mode == "learned" and "channel_multiple" in scores.info.get("l0", {}):
        settings = replace(settings, channel_multiple=int(scores.info["l0"]["channel_multiple"]))  # the masks' own
    if params_before is None:
        params_before = int(scores.info.get("parameters", 0))
        if not params_before:
            raise GqaPruneError("the scores do not record the model's parameter count; pass params_before")
    if settings.layer_criterion not in scores.layer_scores:
        have = ", ".join(sorted(scores.layer_scores)) or "none"
        raise GqaPruneError(
            f"layer criterion {settings.layer_criterion!r} was not computed by the importance stage (has: {have}); "
            "re-run importance with it in --layer-criteria"
        )
    builder = {
        "width": _width_plan, "depth": _depth_layers, "hybrid": _hybrid_layers, "learned": _learned_layers
    }[settings.mode]  # fmt: skip
    plan = PruningPlan(
        geometry=geometry, settings=settings, layers=builder(scores, settings), params_before=params_before
    )
    _warn_on_shortfall(plan)
    return plan


def _warn_on_shortfall(plan: PruningPlan) -> None:
    """Say so when the limits let a plan remove clearly less (or more) than asked: the achieved figure."""
    summary, settings, geometry = plan.param_summary(), plan.settings, plan.geometry
    if settings.mode == "width":
        attn, mlp = settings.width_ratios
        asked = [("attention ", attn, summary["achieved_attn_ratio"]), ("MLP ", mlp, summary["achieved_mlp_ratio"])]
    else:
        asked = [("attention+MLP ", settings.ratio, summary["achieved_ratio"])]
    total = geometry.unit_params()
    step = max(geometry.params_per_group, settings.channel_multiple * geometry.params_per_channel) / total
    for part, target, achieved in asked:
        if abs(achieved - target) > max(step, 0.01):
            logger.warning(
                "the plan removes %.1f%% of %sparameters, not the %.1f%% asked: the limits (max_rate %s, "
                "protected layers, channel_multiple %d, at least one unit per layer) cap it",
                100 * achieved, part, 100 * target, settings.max_rate, settings.channel_multiple,
            )  # fmt: skip


def _width_layers(
    scores: Scores, settings: PlanSettings, ratios: Mapping[str, float] | None = None, absent: Mapping[str, set] = {}
) -> dict[str, tuple[list[float], list[int]]]:
    """Per width kind: continuous rates and units removed per layer, allocated by layer importance.

    ``ratios`` (kind -> fraction of that kind's units to remove) defaults to the settings' attention and
    MLP ratios; layers in ``absent[kind]`` no longer have that kind's sublayer and take no part.
    """
    geometry = scores.geometry
    pressure = layer_pressure(scores.layer_scores[settings.layer_criterion], settings.strategy, settings.alpha)
    uniform = settings.strategy == "uniform"
    if ratios is None:
        ratios = dict(zip((GQA_GROUP.name, MLP_CHANNEL.name), settings.width_ratios))
    allocation = {}
    for kind in (GQA_GROUP, MLP_CHANNEL):
        gone = absent.get(kind.name, set())
        units = tuple(0 if i in gone else kind.count(geometry, i) for i in range(geometry.num_layers))
        prunable = [i not in settings.protected_layers and i not in gone for i in range(geometry.num_layers)]
        step = 1 if kind is GQA_GROUP else settings.channel_multiple
        target = ratios[kind.name]
        what = "attention" if kind is GQA_GROUP else "MLP"
        rates = continuous_rates(pressure, units, prunable, target, settings.min_rate, settings.max_rate, what)
        options = [
            removal_options(n, step, settings.max_rate * n if ok and target > 0 else 0, max(step, kind.min_kept))
            for n, ok in zip(units, prunable)
        ]
        removed = discretize([r * n for r, n in zip(rates, units)], options, target * sum(units), uniform)
        if target > 0 and all(len(choices) == 1 for choices, ok in zip(options, prunable) if ok):
            limit = (
                f"channel_multiple {settings.channel_multiple} is not below any prunable layer's MLP width "
                f"({max(units)})"
                if kind is MLP_CHANNEL
                else "every prunable layer has a single KV group"
            )
            raise GqaPruneError(f"{what} ratio {target:.3g} removes nothing: {limit}; nothing of it can be pruned")
        allocation[kind.name] = (rates, removed)
    return allocation


def _assemble(
    scores: Scores,
    settings: PlanSettings,
    width: dict[str, tuple[list[float], list[int]]],
    structural: Mapping[int, tuple[str, ...]] = {},
    reasons: Mapping[int, list[Removal]] = {},
) -> tuple[LayerPlan, ...]:
    """LayerPlans from width allocations (kept = each layer's top-scoring units) and structural removals."""
    geometry = scores.geometry
    importance = scores.layer_scores[settings.layer_criterion]
    layers = []
    for index in range(geometry.num_layers):
        removed = tuple(structural.get(index, ()))
        if {"attn_sublayer", "mlp_sublayer"} <= set(removed):
            removed = ("layer",)
        kept, rates, why = {}, {}, list(reasons.get(index, ()))
        for kind in (GQA_GROUP, MLP_CHANNEL):
            if "layer" in removed or SUBLAYER_KINDS[kind.scopes[0]].name in removed:
                continue
            layer_rates, units_removed = width[kind.name]
            kept[kind.name] = top_units(
                scores.units[kind.name][index], kind.count(geometry, index) - units_removed[index]
            )
            rates[kind.name] = layer_rates[index]
            if units_removed[index]:
                why.append(Removal(kind.name, units_removed[index], layer_rates[index], f"{settings.strategy} rate"))
        layers.append(LayerPlan(index, float(importance[index]), kept, removed, rates, tuple(why)))
    return tuple(layers)


def _width_plan(scores: Scores, settings: PlanSettings) -> tuple[LayerPlan, ...]:
    return _assemble(scores, settings, _width_layers(scores, settings))


def _whole(geometry: Geometry, index: int) -> dict[str, tuple[int, ...]]:
    return {kind.name: tuple(range(kind.count(geometry, index))) for kind in (GQA_GROUP, MLP_CHANNEL)}


def _depth_layers(scores: Scores, settings: PlanSettings) -> tuple[LayerPlan, ...]:
    """Remove the least important whole layers (by the layer criterion) closest to the target."""
    layers = compose(scores, settings, {"layer": settings.ratio * scores.geometry.unit_params()})
    if settings.ratio > 0 and not any(layer.removes_layer for layer in layers):
        raise GqaPruneError(
            f"mode depth cannot reach ratio {settings.ratio}: every layer is protected or the model has one layer"
        )
    return layers


HYBRID_KINDS = ("layer", "attn_sublayer", "mlp_sublayer", "gqa_group", "mlp_channel")


def structural_importance(scores: Scores, settings: PlanSettings, kind: str) -> list[float]:
    """Per layer, how much a layer or sublayer matters: measured removal when scored, else the layer criterion."""
    for criterion in ("removal", settings.layer_criterion):
        if kind in scores.structural.get(criterion, {}):
            return scores.structural[criterion][kind]
    raise GqaPruneError(
        f"the scores have no {settings.layer_criterion} values for {kind} (written before sublayers could be "
        "scored?); re-run `gqa-prune importance`"
    )


def compose(
    scores: Scores, settings: PlanSettings, amounts: Mapping[str, float], fill_width: bool = False
) -> tuple[LayerPlan, ...]:
    """Remove about ``amounts[kind]`` parameters of each kind: whole layers, then attention and MLP
    sublayers (least important first), then GQA groups and MLP channels of what remains (width allocation).

    With ``fill_width`` the width kinds take whatever the rounding of whole layers and sublayers left of the
    summed amount, split between them as asked.
    """
    geometry = scores.geometry
    structural: dict[int, list[str]] = {i: [] for i in range(geometry.num_layers)}
    reasons: dict[int, list[Removal]] = {i: [] for i in range(geometry.num_layers)}
    removed_params = 0
    for kind in STRUCTURAL_KINDS:
        amount = amounts.get(kind.name, 0.0)
        if amount <= 0:
            continue
        importance = structural_importance(scores, settings, kind.name)
        order = sorted(range(geometry.num_layers), key=lambda i: (importance[i], i))
        taken = 0
        for index in order:
            if index in settings.protected_layers or "layer" in structural[index] or kind.name in structural[index]:
                continue
            if not all(
                any(_keeps(structural[other], scope) for other in range(geometry.num_layers) if other != index)
                for scope in kind.scopes
            ):
                continue  # some layer keeps each sublayer
            params = sum(
                geometry.attention_params(index) if scope == "attn" else geometry.mlp_params(index)
                for scope in kind.scopes
            )
            if abs(taken + params - amount) >= abs(taken - amount):
                break
            structural[index].append(kind.name)
            reasons[index].append(Removal(kind.name, 1, float(importance[index]), _basis(scores, settings, kind.name)))
            taken += params
        removed_params += taken
    absent = {
        width.name: {
            i for i, gone in structural.items() if "layer" in gone or SUBLAYER_KINDS[width.scopes[0]].name in gone
        }
        for width in (GQA_GROUP, MLP_CHANNEL)
    }
    wanted = {name: amounts.get(name, 0.0) for name in (GQA_GROUP.name, MLP_CHANNEL.name)}
    if fill_width:
        rest = max(sum(amounts.values()) - removed_params, 0.0)
        share = sum(wanted.values())
        wanted = {
            name: rest * (value / share if share else float(name == MLP_CHANNEL.name)) for name, value in wanted.items()
        }
    ratios = {}
    for width in (GQA_GROUP, MLP_CHANNEL):
        params = {
            i: width.count(geometry, i) * width.params_per_unit(geometry, i)
            for i in range(geometry.num_layers)
            if i not in absent[width.name]
        }
        available = sum(params.values())
        open_params = sum(value for i, value in params.items() if i not in settings.protected_layers)
        ratios[width.name] = min(wanted[width.name], settings.max_rate * open_params) / available if available else 0.0
    return _assemble(scores, settings, _width_layers(scores, settings, ratios, absent), structural, reasons)


def _keeps(removed: list[str], scope: str) -> bool:
    return "layer" not in removed and SUBLAYER_KINDS[scope].name not in removed


def _basis(scores: Scores, settings: PlanSettings, kind: str) -> str:
    return "removal" if kind in scores.structural.get("removal", {}) else settings.layer_criterion


def _hybrid_layers(scores: Scores, settings: PlanSettings) -> tuple[LayerPlan, ...]:
    """Split the target between kinds by their measured loss curves (equal marginal loss per parameter)."""
    missing = [kind for kind in HYBRID_KINDS if kind not in scores.curves]
    if missing:
        raise GqaPruneError(
            f"mode hybrid needs measured loss curves of every kind; these scores lack {', '.join(missing)} "
            "(re-run `gqa-prune importance` without --no-curves)"
        )
    total = scores.geometry.unit_params()
    target = settings.ratio * total
    curves = {kind: scores.curves[kind].loss for kind in HYBRID_KINDS}
    limits = {kind: scores.curves[kind].max_params for kind in HYBRID_KINDS}
    amounts = split_by_curves(curves, limits, target, step=total / 400)
    reachable = sum(amounts.values())
    if reachable < target * (1 - 1e-6):
        raise GqaPruneError(
            f"mode hybrid cannot reach ratio {settings.ratio}: the measured loss curves cover at most "
            f"{reachable / total:.3f} (importance measures up to {max(CURVE_FRACTIONS)} per kind)"
        )
    layers = compose(scores, settings, amounts, fill_width=True)
    removed = sum(_removed_params(scores.geometry, layer) for layer in layers)
    step = max(scores.geometry.params_per_group, settings.channel_multiple * scores.geometry.params_per_channel)
    if removed < target - step:  # within one removal step of the target is as close as units allow
        raise GqaPruneError(
            f"mode hybrid cannot reach ratio {settings.ratio} under the limits (protected layers, max_rate "
            f"{settings.max_rate}, channel_multiple {settings.channel_multiple}): the largest reachable is "
            f"{removed / total:.3f}"
        )
    return layers


def _removed_params(geometry: Geometry, layer: LayerPlan) -> int:
    """Attention+MLP projection parameters a layer plan removes (what ratios count)."""
    removed = 0
    for scope, kind in (("attn", GQA_GROUP), ("mlp", MLP_CHANNEL)):
        kept = len(layer.kept.get(kind.name, ())) if layer.keeps(scope) else 0
        removed += (kind.count(geometry, layer.layer) - kept) * kind.params_per_unit(geometry, layer.layer)
    return removed


CURVE_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4)  # of all attention+MLP parameters, per kind, measured by importance


# ---------------------------------------------------------------------------------------------- learned masks
SIZE_TOLERANCE = 0.01  # learned masks land within 1 % of the target size (attention+MLP parameters kept)


def _learned_layers(scores: Scores, settings: PlanSettings) -> tuple[LayerPlan, ...]:
    """Mode ``learned``: keep exactly the units whose deterministic learned mask is 1 (``gqa-prune learn-masks``).

    The masks fix the size, so ``settings.ratio`` must be the ratio they were learned for: the size they keep
    must be within ``SIZE_TOLERANCE`` of the size the ratio asks for (for another size, learn masks to it).
    """
    if not scores.masks:
        raise GqaPruneError(
            f"mode learned keeps the units of learned masks, and these {scores.criterion} scores have none "
            "(write them with `gqa-prune learn-masks`, or choose --mode width, depth or hybrid)"
        )
    geometry = scores.geometry
    importance = scores.layer_scores[settings.layer_criterion]
    learned = scores.structural.get(scores.criterion, {})
    layers = []
    for index in range(geometry.num_layers):

        def mask(kind: str) -> torch.Tensor:
            per_layer = scores.masks.get(kind)
            return torch.ones(KINDS[kind].count(geometry, index)) if per_layer is None else per_layer[index]

        removed = tuple(kind.name for kind in STRUCTURAL_KINDS if len(mask(kind.name)) and not mask(kind.name).any())
        if "layer" in removed or {"attn_sublayer", "mlp_sublayer"} <= set(removed):
            removed = ("layer",)
        reasons = [
            Removal(kind, 1, float(learned.get(kind, [0.0] * geometry.num_layers)[index]), "learned log-alpha")
            for kind in removed
        ]
        kept = {}
        for kind in (GQA_GROUP, MLP_CHANNEL):
            if "layer" in removed or SUBLAYER_KINDS[kind.scopes[0]].name in removed:
                continue
            values = mask(kind.name)
            kept[kind.name] = tuple(int(i) for i in torch.nonzero(values).flatten().tolist())
            gone = len(values) - len(kept[kind.name])
            if gone:
                removed_scores = scores.units[kind.name][index][values == 0]
                reasons.append(Removal(kind.name, gone, float(removed_scores.max()), "largest removed log-alpha"))
        if index in settings.protected_layers and (removed or any(reason.kind in kept for reason in reasons)):
            raise GqaPruneError(f"layer {index} is protected but the learned masks prune it; learn masks with it kept")
        layers.append(LayerPlan(index, float(importance[index]), kept, removed, {}, tuple(reasons)))
    total = geometry.unit_params()
    achieved = sum(_removed_params(geometry, layer) for layer in layers) / total
    if abs(achieved - settings.ratio) > SIZE_TOLERANCE * (1.0 - settings.ratio):
        raise GqaPruneError(
            f"the learned masks remove {achieved:.4f} of attention+MLP parameters; mode learned reproduces them "
            f"exactly and takes only that ratio (within {SIZE_TOLERANCE:.0%} of the size), not {settings.ratio}: "
            "learn masks to the ratio you want (`gqa-prune learn-masks --ratio`)"
        )
    return tuple(layers)
