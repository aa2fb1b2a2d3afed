"""``ExpertPlan``: which routed experts every MoE layer keeps, and which intermediate channels each kept expert
keeps, built from expert scores.

Experts: ``uniform`` (the default) removes ``round(expert_ratio x experts)`` experts of every MoE layer, the
lowest-scored under the chosen criterion, so the pruned model keeps one expert count in its config and stock
``from_pretrained`` loads it with no custom code -- as every released pruned MoE does. ``per-layer`` removes
the same total but splits it between layers by their measured loss curves (the hybrid currency: calibration
loss per parameter removed; layers whose experts cost less lose more) and, with ``width_ratio``, between
experts, GQA groups and shared-MLP channels too; ``ranked`` ranks all MoE layers' experts together by the
criterion's value instead. Either way the checkpoint then records per-layer counts (``per_layer_config``) and
loads through the project's modeling file. A layer keeps at least ``num_experts_per_tok`` experts.

Expert channels: ``channel_ratio`` removes ``round(channel_ratio x width)`` intermediate channels of every kept
expert (each expert its own lowest-scored ones; the fused expert tensors need one width per layer); with
``per-layer`` that share of the expert channels' parameters instead, each layer's width priced by its curve.

The width kinds a dense model has too (``width_ratio``, `plan --ratio`): ``round(width_ratio x KV heads)`` GQA
groups (a KV head with its query heads) of every attention layer, those that write least to the residual
stream, and ``round(width_ratio x width)`` channels of every shared MLP (rounded down to ``channel_multiple``),
the lowest Wanda-style scores; state-space layers keep everything. One count for all layers keeps the config
stock (``per-layer`` prices these counts per layer instead, see above).

A plan is a value: it round-trips through JSON exactly and is validated on construction (kept indices
integers, sorted, unique, in range; at least top-k experts in every MoE layer, none in a dense layer; one
channel count per layer, at least one channel; one group and shared-channel count for all layers unless
``per-layer``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .allocation import split_by_steps
from .atomic import MARKER, write_text
from .choices import EXPERT_ALLOCATIONS
from .criteria.experts import CHANNEL_STAT, EXPERT_CRITERIA, GROUP_STAT, SHARED_STAT
from .errors import GqaPruneError
from .expert_scores import LAYER_KIND, ExpertScores
from .moe import MOE_FAMILIES, SUBLAYERS, ExpertGeometry
from .planning import PLAN_KIND, PruningPlan, top_units
from .scores import LossCurve
from .settings import ExpertPlanSettings

EXPERT_PLAN_FORMAT = "gqa-prune-expert-plan"
EXPERT_PLAN_VERSION = 1
EXPERT_KIND = "expert"  # a candidate of the per-layer allocation beside GROUP_STAT and SHARED_STAT
EXPERT_CURVE_FRACTIONS = (0.25, 0.5, 0.75)  # of one MoE layer's experts: where importance measures its loss curve
Channels = tuple[tuple[int, ...], ...]  # per kept expert of a layer: its kept channels


@dataclass(frozen=True)
class ExpertPlan:
    geometry: ExpertGeometry  # the model the plan applies to
    expert_ratio: float
    criterion: str
    kept: tuple[tuple[int, ...], ...]  # per decoder layer: kept experts (empty where the MLP is dense)
    params_before: int  # all parameters of that model (embeddings included, tied ones once)
    seed: int = 0  # of the random criterion
    allocation: str = "uniform"
    channel_ratio: float = 0.0
    channels: tuple[Channels, ...] | None = None  # per layer, per kept expert: kept channels (None: all)
    width_ratio: float = 0.0
    groups: tuple[tuple[int, ...], ...] | None = None  # per layer: kept GQA groups (empty: no attention; None: all)
    shared_channels: tuple[tuple[int, ...], ...] | None = None  # per layer: kept shared-MLP channels (likewise)
    removed_layers: tuple[int, ...] = ()  # decoder layers removed whole (their units are listed as all kept)
    # (layer, SUBLAYERS name): an attention block or a MoE block removed from a kept layer (its units listed as kept)
    removed_sublayers: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        geometry = self.geometry
        if self.allocation not in EXPERT_ALLOCATIONS:
            raise GqaPruneError(f"expert allocation {self.allocation!r} is not one of {', '.join(EXPERT_ALLOCATIONS)}")
        if len(self.kept) != geometry.num_layers:
            raise GqaPruneError(f"plan has {len(self.kept)} layers but the model has {geometry.num_layers}")
        for layer, (kept, experts) in enumerate(zip(self.kept, geometry.experts)):
            where = f"layer {layer}: kept experts"
            _check_indices(kept, experts, where)
            if not experts:
                if kept:
                    raise GqaPruneError(f"{where} must be empty: layer {layer} has a dense MLP")
                continue
            if len(kept) < geometry.top_k:
                raise GqaPruneError(
                    f"{where}: {len(kept)} of {experts}, fewer than the {geometry.top_k} experts every token is "
                    "routed to (num_experts_per_tok)"
                )
        if self.allocation == "uniform" and len({len(kept) for kept in self.kept if kept}) > 1:
            raise GqaPruneError("a uniform expert plan keeps the same number of experts in every MoE layer")
        if self.channels is not None:
            self._validate_channels()
        if self.groups is not None:
            self._validate_width_kind(self.groups, self.geometry.kv_groups, "GQA groups", "attention layer")
        if self.shared_channels is not None:
            self._validate_width_kind(
                self.shared_channels, self.geometry.shared_widths, "shared-MLP channels", "shared MLP"
            )
        if self.removed_layers:
            self._validate_removed_layers()
        if self.removed_sublayers:
            self._validate_removed_sublayers()

    def _validate_removed_layers(self) -> None:
        """Removed layers: valid indices, not every layer, recorded layer sizes, their units all listed as kept."""
        geometry = self.geometry
        _check_indices(self.removed_layers, geometry.num_layers, "removed layers")
        if len(geometry.layer_params) != geometry.num_layers:
            raise GqaPruneError(
                "plan removes layers but its geometry records no layer sizes; re-run `gqa-prune importance`"
            )
        if set(geometry.moe_layers) <= set(self.removed_layers):
            raise GqaPruneError("plan removes every layer with experts; at least one must stay")
        for layer in self.removed_layers:
            self._check_listed_whole(layer, SUBLAYERS, f"layer {layer} is removed whole")

    def _check_listed_whole(self, layer: int, sublayers: tuple[str, ...], what: str) -> None:
        """The units of ``layer`` that belong to ``sublayers`` must all be listed as kept."""
        geometry = self.geometry
        listed = []
        if "attention" in sublayers and self.groups is not None:
            listed.append((self.groups[layer], geometry.kv_groups[layer]))
        if "mlp" in sublayers:
            listed.append((self.kept[layer], geometry.experts[layer]))
            if self.shared_channels is not None:
                listed.append((self.shared_channels[layer], geometry.shared_widths[layer]))
            if self.channels is not None:
                listed += [(channels, geometry.widths[layer]) for channels in self.channels[layer]]
        if any(tuple(kept) != tuple(range(size)) for kept, size in listed):
            raise GqaPruneError(f"{what}; its units must all be listed as kept")

    def _validate_removed_sublayers(self) -> None:
        """Removed sublayers: sorted (layer, name) pairs of recorded, present sublayers of kept layers, not both
        of one layer (that is the layer), their units all listed as kept, some MoE block left."""
        geometry = self.geometry
        if len(geometry.sublayer_params) != geometry.num_layers:
            raise GqaPruneError(
                "plan removes sublayers but its geometry records no sublayer sizes; re-run `gqa-prune importance`"
            )
        pairs = [tuple(pair) for pair in self.removed_sublayers]
        if pairs != sorted(set(pairs)):
            raise GqaPruneError(f"removed sublayers must be sorted, unique (layer, name) pairs, got {pairs!r}")
        for layer, name in pairs:
            if not (isinstance(layer, int) and 0 <= layer < geometry.num_layers) or name not in SUBLAYERS:
                raise GqaPruneError(
                    f"removed sublayer ({layer!r}, {name!r}): give a layer in 0..{geometry.num_layers - 1} and one "
                    f"of {', '.join(SUBLAYERS)}"
                )
            if layer in self.removed_layers:
                raise GqaPruneError(f"layer {layer} is removed whole; it cannot also lose its {name} sublayer")
            if not geometry.sublayer_params[layer][SUBLAYERS.index(name)]:
                raise GqaPruneError(f"layer {layer} has no {name} sublayer to remove")
            self._check_listed_whole(layer, (name,), f"layer {layer} loses its {name} sublayer")
        layers = [layer for layer, _ in pairs]
        if len(set(layers)) != len(layers):
            raise GqaPruneError("removed sublayers name both sublayers of a layer; remove the layer instead")
        without_moe = set(self.removed_layers) | {layer for layer, name in pairs if name == "mlp"}
        if set(geometry.moe_layers) <= without_moe:
            raise GqaPruneError("plan removes every MoE block; at least one must stay")

    def _validate_width_kind(self, kept_per_layer, sizes: tuple[int, ...], what: str, owner: str) -> None:
        """Kept units of a dense width kind: valid indices, at least one where the layer has any, none where
        it has none, the same count in every layer."""
        layers = self.geometry.num_layers
        if len(sizes) != layers:
            raise GqaPruneError(f"plan keeps {what} but its geometry records none; rebuild it with `gqa-prune plan`")
        if len(kept_per_layer) != layers:
            raise GqaPruneError(f"plan lists {what} of {len(kept_per_layer)} layers, the model has {layers}")
        for layer, (kept, size) in enumerate(zip(kept_per_layer, sizes)):
            _check_indices(kept, size, f"layer {layer}: kept {what}")
            if bool(kept) != bool(size):
                raise GqaPruneError(f"layer {layer}: a {owner} keeps at least one of its {what}, other layers none")
        if self.allocation != "per-layer" and len({len(kept) for kept in kept_per_layer if kept}) > 1:
            raise GqaPruneError(
                f"an expert plan keeps the same number of {what} in every {owner} (but with --experts per-layer)"
            )

    def _validate_channels(self) -> None:
        if len(self.channels) != self.geometry.num_layers:
            raise GqaPruneError(
                f"plan lists channels of {len(self.channels)} layers, the model has {self.geometry.num_layers}"
            )
        for layer, (per_expert, kept) in enumerate(zip(self.channels, self.kept)):
            if len(per_expert) != len(kept):
                raise GqaPruneError(
                    f"layer {layer}: kept channels are listed for {len(per_expert)} experts, it keeps {len(kept)}"
                )
            for expert, channels in zip(kept, per_expert):
                _check_indices(channels, self.geometry.widths[layer], f"layer {layer}: expert {expert}'s kept channels")
                if not channels:
                    raise GqaPruneError(f"layer {layer}: expert {expert} keeps no channel")
            if len({len(channels) for channels in per_expert}) > 1:
                raise GqaPruneError(f"layer {layer}: every expert of a layer keeps the same number of channels")

    # ------------------------------------------------------------------------------------------ derived
    def kept_width(self, layer: int) -> int:
        """Channels each kept expert of ``layer`` keeps."""
        if self.channels is None or not self.kept[layer]:
            return self.geometry.widths[layer] if self.kept[layer] else 0
        return len(self.channels[layer][0])

    def _sliced_geometry(self) -> ExpertGeometry:
        """The geometry after the units go (every layer and sublayer still there, its units as listed)."""
        geometry = self.geometry
        kv_groups = geometry.kv_groups if self.groups is None else tuple(map(len, self.groups))
        shared = geometry.shared_widths if self.shared_channels is None else tuple(map(len, self.shared_channels))
        return replace(
            geometry,
            experts=tuple(len(kept) for kept in self.kept),
            widths=tuple(self.kept_width(layer) for layer in range(geometry.num_layers)),
            kv_groups=kv_groups,
            shared_widths=shared,
        )

    def pruned_geometry(self) -> ExpertGeometry:
        """The geometry of the pruned model (removed sublayers' units and sizes zero, removed layers gone, the
        others renumbered in order)."""
        geometry, sliced = self.geometry, self._sliced_geometry()

        def shrunk(size: int, layer: int, sublayers: tuple[str, ...] = SUBLAYERS) -> int:
            return size - _owned(geometry, layer, sublayers) + _owned(sliced, layer, sublayers)

        sliced = replace(
            sliced,
            layer_params=tuple(shrunk(size, i) for i, size in enumerate(geometry.layer_params)),
            sublayer_params=tuple(
                tuple(shrunk(size, i, (name,)) for name, size in zip(SUBLAYERS, sizes))
                for i, sizes in enumerate(geometry.sublayer_params)
            ),
        )
        if self.removed_sublayers:
            sliced = _without_sublayers(sliced, self.removed_sublayers)
        kept_layers = [layer for layer in range(geometry.num_layers) if layer not in self.removed_layers]
        per_layer = ("experts", "widths", "kv_groups", "shared_widths", "layer_params", "sublayer_params")
        return replace(sliced, **{
            name: tuple(getattr(sliced, name)[layer] for layer in kept_layers) if getattr(sliced, name) else ()
            for name in per_layer
        })  # fmt: skip

    def cut_groups(self, layer: int) -> bool:
        """Whether ``layer`` loses GQA groups (its o_proj loses inputs)."""
        return self.groups is not None and 0 < len(self.groups[layer]) < self.geometry.kv_groups[layer]

    def cut_shared_channels(self, layer: int) -> bool:
        """Whether ``layer``'s shared MLP loses channels (its output projection loses inputs)."""
        shared = self.shared_channels
        return shared is not None and 0 < len(shared[layer]) < self.geometry.shared_widths[layer]

    def cut_expert_channels(self, layer: int) -> bool:
        """Whether the kept experts of ``layer`` lose channels (their down_proj loses inputs)."""
        width = self.geometry.widths[layer]
        return self.channels is not None and any(len(kept) < width for kept in self.channels[layer])

    @property
    def cuts_columns(self) -> bool:
        """Whether any layer the plan keeps loses inputs of an output projection (what a refit can make up for)."""
        return any(
            self.cut_groups(layer) or self.cut_shared_channels(layer) or self.cut_expert_channels(layer)
            for layer in range(self.geometry.num_layers)
            if layer not in self.removed_layers
        )

    @property
    def is_uniform(self) -> bool:
        """One expert count and width for every MoE layer, one GQA group count for every attention layer and one
        width for every shared MLP, and no layer short of a sublayer (a stock config describes it)."""
        if self.removed_sublayers:
            return False
        pruned = self.pruned_geometry()
        moe, shared = pruned.moe_layers, [i for i, width in enumerate(pruned.shared_widths) if width]
        return all(
            len({sizes[i] for i in layers}) <= 1
            for sizes, layers in (
                (pruned.experts, moe), (pruned.widths, moe), (pruned.kv_groups, pruned.attention_layers),
                (pruned.shared_widths, shared),
            )
        )  # fmt: skip

    @property
    def params_after(self) -> int:
        """Parameters of the pruned model: the units removed from kept layers and every removed layer's all."""
        before, sliced = self.geometry, self._sliced_geometry()
        removed_units = sum(
            _owned(before, layer) - _owned(sliced, layer)
            for layer in range(before.num_layers)
            if layer not in self.removed_layers
        )
        removed_sublayers = sum(
            before.sublayer_params[layer][SUBLAYERS.index(name)] for layer, name in self.removed_sublayers
        )
        removed_layers = sum(before.layer_params[layer] for layer in self.removed_layers)
        return self.params_before - removed_units - removed_sublayers - removed_layers

    def summary(self) -> dict:
        before, after = self.geometry, self.pruned_geometry()
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "experts_before": sum(before.experts),
            "experts_after": sum(after.experts),
            "achieved_expert_ratio": 1 - sum(after.experts) / max(1, sum(before.experts)),
            "expert_params_before": before.expert_params,
            "expert_params_after": after.expert_params,
            "kv_groups_before": sum(before.kv_groups),
            "kv_groups_after": sum(after.kv_groups),
            "shared_channels_before": sum(before.shared_widths),
            "shared_channels_after": sum(after.shared_widths),
            "layers_before": before.num_layers,
            "layers_after": after.num_layers,
            "sublayers_removed": len(self.removed_sublayers),
        }

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": EXPERT_PLAN_FORMAT,
            "version": EXPERT_PLAN_VERSION,
            "geometry": self.geometry.to_dict(),
            "expert_ratio": self.expert_ratio,
            "criterion": self.criterion,
            "allocation": self.allocation,
            "channel_ratio": self.channel_ratio,
            "seed": self.seed,
            "params_before": self.params_before,
            "summary": self.summary(),  # derived; checked on load
            "width_ratio": self.width_ratio,
            "kept_groups": None if self.groups is None else [list(kept) for kept in self.groups],
            "kept_shared_channels": None
            if self.shared_channels is None
            else [list(kept) for kept in self.shared_channels],
            "removed_layers": list(self.removed_layers),
            "removed_sublayers": [list(pair) for pair in self.removed_sublayers],
            "kept_experts": [list(kept) for kept in self.kept],
            "kept_channels": None if self.channels is None else [[list(c) for c in layer] for layer in self.channels],
            MARKER: PLAN_KIND,
        }

    def to_json(self) -> str:
        """Pretty JSON with one compact line per layer (channel lists are long)."""
        data = self.to_dict()
        kept, channels = data.pop("kept_experts"), data.pop("kept_channels")
        head = json.dumps(data, indent=2, sort_keys=True)
        experts_body = ",\n".join("    " + json.dumps(layer) for layer in kept)
        text = head[:-2] + ',\n  "kept_experts": [\n' + experts_body + "\n  ],\n"
        if channels is None:
            return text + '  "kept_channels": null\n}\n'
        channels_body = ",\n".join("    " + json.dumps(layer) for layer in channels)
        return text + '  "kept_channels": [\n' + channels_body + "\n  ]\n}\n"

    @classmethod
    def from_dict(cls, data: dict) -> ExpertPlan:
        if data.get("format") != EXPERT_PLAN_FORMAT or data.get("version") != EXPERT_PLAN_VERSION:
            raise GqaPruneError(f"not a gqa-prune expert plan (format {data.get('format')!r})")
        channels, groups, shared = data.get("kept_channels"), data.get("kept_groups"), data.get("kept_shared_channels")
        plan = cls(
            geometry=ExpertGeometry.from_dict(data["geometry"]),
            expert_ratio=float(data["expert_ratio"]),
            criterion=str(data["criterion"]),
            kept=tuple(tuple(kept) for kept in data["kept_experts"]),
            params_before=int(data["params_before"]),
            seed=int(data.get("seed", 0)),
            allocation=str(data.get("allocation", "uniform")),
            channel_ratio=float(data.get("channel_ratio", 0.0)),
            channels=None if channels is None else tuple(tuple(tuple(c) for c in layer) for layer in channels),
            width_ratio=float(data.get("width_ratio", 0.0)),
            groups=None if groups is None else tuple(tuple(kept) for kept in groups),
            shared_channels=None if shared is None else tuple(tuple(kept) for kept in shared),
            removed_layers=tuple(data.get("removed_layers", ())),
            removed_sublayers=tuple(tuple(pair) for pair in data.get("removed_sublayers", ())),
        )
        stored = data.get("summary")
        if isinstance(stored, dict) and any(
            key in stored and stored[key] != value for key, value in plan.summary().items()
        ):
            raise GqaPruneError(
                "plan summary does not match its kept experts (was the file edited?); rebuild it with `gqa-prune plan`"
            )
        return plan

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json(), PLAN_KIND)


def _owned(geometry: ExpertGeometry, layer: int, sublayers: tuple[str, ...] = SUBLAYERS) -> int:
    """Parameters of one layer's GQA groups (the attention sublayer) and experts and shared-MLP channels (the
    MLP sublayer) under ``geometry``, of the ``sublayers`` named."""
    owned = 0
    if "attention" in sublayers and geometry.kv_groups:
        owned += geometry.kv_groups[layer] * geometry.params_per_group
    if "mlp" in sublayers:
        shared = geometry.shared_widths[layer] if geometry.shared_widths else 0
        owned += (
            geometry.experts[layer] * geometry.params_per_expert(layer) + shared * geometry.params_per_shared_channel
        )
    return owned


def _without_sublayers(geometry: ExpertGeometry, removed: tuple[tuple[int, str], ...]) -> ExpertGeometry:
    """``geometry`` with the units of the removed sublayers zero and their parameters gone from the layer sizes."""
    lists = {name: list(getattr(geometry, name)) for name in ("experts", "widths", "kv_groups", "shared_widths")}
    sizes, sublayer_sizes = list(geometry.layer_params), [list(pair) for pair in geometry.sublayer_params]
    for layer, name in removed:
        zeroed = ("kv_groups",) if name == "attention" else ("experts", "widths", "shared_widths")
        for kind in zeroed:
            if lists[kind]:
                lists[kind][layer] = 0
        sizes[layer] -= sublayer_sizes[layer][SUBLAYERS.index(name)]
        sublayer_sizes[layer][SUBLAYERS.index(name)] = 0
    return replace(
        geometry, **{name: tuple(values) for name, values in lists.items()}, layer_params=tuple(sizes),
        sublayer_params=tuple(map(tuple, sublayer_sizes)),
    )  # fmt: skip


def _check_indices(kept, size: int, where: str) -> None:
    if not all(isinstance(index, int) and not isinstance(index, bool) for index in kept):
        raise GqaPruneError(f"{where} must be integer indices, got {list(kept)!r}")
    if list(kept) != sorted(set(kept)) or (kept and (kept[0] < 0 or kept[-1] >= size)):
        raise GqaPruneError(f"{where} must be sorted, unique indices in 0..{size - 1}")


# ---------------------------------------------------------------------------------------------- building
def build_expert_plan(scores: ExpertScores, settings: ExpertPlanSettings) -> ExpertPlan:
    """Remove ``expert_ratio`` of the experts (lowest-scored under the criterion; the same count in every MoE
    layer, or ranked across layers with allocation "per-layer"), ``channel_ratio`` of every kept expert's
    intermediate channels (lowest channel scores; kept widths rounded down to ``channel_multiple``: fused
    expert kernels such as torch's grouped_mm need rows of a multiple of 16 bytes) and ``width_ratio`` of every
    attention layer's GQA groups (lowest output norms)."""
    settings.validate()
    geometry = scores.geometry
    criterion = EXPERT_CRITERIA[settings.criterion]
    layer_scores = {
        layer: criterion.scores(scores.layer_stats(layer), layer, settings.seed) for layer in geometry.moe_layers
    }
    priced = _priced_counts(scores, settings) if settings.allocation == "per-layer" else PricedCounts({})
    if settings.allocation == "uniform":
        keep = _uniform_counts(geometry, settings.expert_ratio)
    elif settings.allocation == "per-layer":
        keep = priced.experts
    else:
        keep = _ranked_counts(geometry, settings.expert_ratio, layer_scores)
    removed_layers, removed_sublayers = priced.removed_layers, priced.removed_sublayers
    kept = tuple(
        top_units(layer_scores[layer], keep[layer]) if layer in keep else () for layer in range(geometry.num_layers)
    )
    channels = None
    if settings.channel_ratio > 0:
        whole = {*removed_layers, *(layer for layer, name in removed_sublayers if name == "mlp")}
        channels = _kept_channels(scores, kept, settings, whole, priced.widths)
    groups = shared = None
    if settings.width_ratio > 0 and priced.groups is not None:
        groups = _top_per_layer(scores, GROUP_STAT, priced.groups)
        shared = _top_per_layer(scores, SHARED_STAT, priced.shared) if priced.shared else None
    elif settings.width_ratio > 0:
        groups = _kept_groups(scores, settings.width_ratio)
        shared = _kept_shared_channels(scores, settings.width_ratio, settings.channel_multiple)
    return ExpertPlan(
        geometry, settings.expert_ratio, settings.criterion, kept, int(scores.info["parameters"]), settings.seed,
        settings.allocation, settings.channel_ratio, channels, settings.width_ratio, groups, shared, removed_layers,
        removed_sublayers,
    )  # fmt: skip


def _top_per_layer(scores: ExpertScores, stat: str, counts: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """Per layer, the ``counts[layer]`` highest-scored units under ``stat`` (none where the layer has none)."""
    return tuple(
        top_units(scores.stats[stat][layer], counts[layer]) if layer in counts else ()
        for layer in range(scores.geometry.num_layers)
    )


def _has_shared_mlps(scores: ExpertScores) -> bool:
    """Whether the family has shared MLPs (refusing scores written before their channels were recorded)."""
    if MOE_FAMILIES[scores.geometry.family].shared_mlp is None:
        return False
    if not scores.geometry.shared_widths:
        raise GqaPruneError(
            "--ratio: these expert scores were written before shared-MLP channels were recorded; re-run "
            "`gqa-prune importance`"
        )
    return True


def _check_groups_recorded(scores: ExpertScores) -> None:
    """GQA groups can be removed: recorded by the scores, and not normalised across all heads together."""
    family = MOE_FAMILIES[scores.geometry.family]
    if not scores.geometry.kv_groups:
        raise GqaPruneError(
            "--ratio: these expert scores were written before GQA groups were recorded; re-run `gqa-prune importance`"
        )
    if family.heads_normed_together:
        raise GqaPruneError(
            f"--ratio: {family.family} normalises q and k across all heads together (q_norm over num_heads x "
            "head_dim), so removing a GQA group changes every other head; prune its experts only"
        )


def _kept_shared_channels(scores: ExpertScores, ratio: float, multiple: int) -> tuple[tuple[int, ...], ...] | None:
    """Every shared MLP keeps ``width - round(ratio x width)`` channels rounded down to ``multiple``, the
    highest-scored; None for a family without shared MLPs."""
    geometry = scores.geometry
    if not _has_shared_mlps(scores):
        return None
    kept = []
    for layer, width in enumerate(geometry.shared_widths):
        keep = (width - round(ratio * width)) // multiple * multiple
        if width and keep < 1:
            raise GqaPruneError(
                f"--ratio {ratio} keeps no channel of layer {layer}'s {width}-channel shared MLP in multiples of "
                f"{multiple} (--channel-multiple)"
            )
        kept.append(top_units(scores.stats[SHARED_STAT][layer], keep) if width else ())
    return tuple(kept)


def _kept_groups(scores: ExpertScores, ratio: float) -> tuple[tuple[int, ...], ...]:
    """Every attention layer keeps ``groups - round(ratio x groups)`` GQA groups, those with the highest
    output norms."""
    geometry = scores.geometry
    _check_groups_recorded(scores)
    kept = []
    for layer, groups in enumerate(geometry.kv_groups):
        keep = groups - round(ratio * groups)
        if groups and keep < 1:
            raise GqaPruneError(
                f"--ratio {ratio} keeps no GQA group of layer {layer}'s {groups}; at most {(groups - 1) / groups:.4g} "
                "is possible"
            )
        kept.append(top_units(scores.stats[GROUP_STAT][layer], keep) if groups else ())
    return tuple(kept)


def _uniform_counts(geometry: ExpertGeometry, ratio: float) -> dict[int, int]:
    counts = {}
    for layer in geometry.moe_layers:
        experts = geometry.experts[layer]
        counts[layer] = experts - round(ratio * experts)
        if counts[layer] < geometry.top_k:
            raise GqaPruneError(
                f"--expert-ratio {ratio} keeps {counts[layer]} of layer {layer}'s {experts} experts, fewer than the "
                f"{geometry.top_k} every token is routed to (num_experts_per_tok); at most "
                f"{(experts - geometry.top_k) / experts:.4g} is possible"
            )
    return counts


@dataclass(frozen=True)
class PricedCounts:
    """What ``--experts per-layer`` keeps: experts per MoE layer, and per layer the GQA groups, shared-MLP
    channels and channels per expert of the kinds that took part (None for the others); what it removes whole."""

    experts: dict[int, int]
    groups: dict[int, int] | None = None
    shared: dict[int, int] | None = None
    widths: dict[int, int] | None = None
    removed_layers: tuple[int, ...] = ()
    removed_sublayers: tuple[tuple[int, str], ...] = ()


def _priced_counts(scores: ExpertScores, settings: ExpertPlanSettings) -> PricedCounts:
    """``--experts per-layer``: the parameters the ratios remove (``expert_ratio`` of the expert parameters; with
    ``width_ratio`` that share of the GQA groups' and shared-MLP channels' parameters; with ``channel_ratio``
    that share of the expert channels' parameters) go one unit at a time from the layer and kind whose measured
    loss rises least per parameter (optimal for convex curves: their lower hulls are). Each layer gives at most
    what its curve measured; an MoE layer keeps top-k experts, an attention layer one group, a shared MLP and
    every expert ``channel_multiple`` channels (kept widths stay multiples of it). With ``whole_layers`` every
    decoder layer and its single blocks are candidates too, priced by what removing them adds to what their
    units gave so far."""
    geometry = scores.geometry
    if any(layer not in scores.curves for layer in geometry.moe_layers):
        raise GqaPruneError(
            "--experts per-layer prices layers by measured loss curves; these scores lack them "
            "(re-run `gqa-prune importance` without --no-curves, or use --experts ranked)"
        )
    curves: dict[tuple[str, int], object] = {}
    steps: dict[tuple[str, int], list[int]] = {}

    def candidate(kind: str, layer: int, curve: LossCurve | None, removed_units: list[int], unit_params: int) -> None:
        """A layer's units of one kind: steps up to what its curve measured (none without a curve)."""
        curves[kind, layer] = curve.loss if curve is not None else None
        reach = curve.max_params if curve is not None else 0
        steps[kind, layer] = [n * unit_params for n in removed_units if n * unit_params <= reach]

    for layer in geometry.moe_layers:
        experts = geometry.experts[layer]
        candidate(EXPERT_KIND, layer, scores.curves[layer], list(range(1, experts - geometry.top_k + 1)),
                  geometry.params_per_expert(layer))  # fmt: skip
    target = settings.expert_ratio * geometry.expert_params
    sizes: dict[str, tuple[int, ...]] = {}  # the width kinds that take part: per layer, how many units
    if settings.width_ratio > 0:
        _check_groups_recorded(scores)
        sizes[GROUP_STAT] = geometry.kv_groups
        if _has_shared_mlps(scores):
            sizes[SHARED_STAT] = geometry.shared_widths
        target += settings.width_ratio * (geometry.group_params + geometry.shared_params)
    if settings.channel_ratio > 0:
        sizes[CHANNEL_STAT] = geometry.widths
        target += settings.channel_ratio * sum(
            geometry.experts[layer] * geometry.widths[layer] * geometry.params_per_channel
            for layer in geometry.moe_layers
        )
    for kind, per_layer in sizes.items():
        if kind not in scores.width_curves:
            raise GqaPruneError(
                f"--experts per-layer prices {_KIND_NAMES[kind]} by measured loss curves; these scores lack them "
                "(re-run `gqa-prune importance` without --no-curves)"
            )
        multiple = 1 if kind == GROUP_STAT else settings.channel_multiple
        if kind == CHANNEL_STAT and not any(size >= 2 * multiple for size in per_layer):
            raise GqaPruneError(
                f"--expert-channel-ratio {settings.channel_ratio}: experts of {max(per_layer)} channels cannot lose "
                f"channels in multiples of {multiple} (--channel-multiple) and keep one multiple"
            )
        for layer, size in enumerate(per_layer):
            if size:
                kept_sizes = [k * multiple for k in range(size // multiple, 0, -1) if k * multiple < size]
                candidate(kind, layer, scores.width_curves[kind].get(layer), [size - k for k in kept_sizes],
                          _unit_params(geometry, kind, layer))  # fmt: skip
    wholes = _whole_candidates(scores, curves, steps) if settings.whole_layers else {}
    taken = _split_counting_overlap(geometry, curves, steps, target, wholes)
    removed = sum(steps[key][count - 1] for key, count in taken.items() if count)
    if all(count == len(steps[key]) for key, count in taken.items()) and removed < target * (1 - 1e-9):
        raise GqaPruneError(
            f"--experts per-layer: the ratios remove {target:,.0f} parameters, but the measured loss curves reach "
            f"{removed:,} (up to {max(EXPERT_CURVE_FRACTIONS):.0%} of each layer's units, every layer keeping "
            f"{geometry.top_k} experts and one GQA group); use --experts uniform or ranked"
        )
    removed_layers = {layer for (kind, layer), count in taken.items() if kind == LAYER_KIND and count}
    sublayers = sorted((layer, kind) for (kind, layer), count in taken.items() if kind in SUBLAYERS and count)
    removed_layers |= {layer for layer, kind in sublayers if (layer, _other(kind)) in sublayers}  # both: the layer
    removed_sublayers = tuple((layer, kind) for layer, kind in sublayers if layer not in removed_layers)
    experts = {layer: geometry.experts[layer] - taken[EXPERT_KIND, layer] for layer in geometry.moe_layers}
    kept: dict[str, dict[int, int]] = {kind: {} for kind in sizes}
    for kind, per_layer in sizes.items():
        for layer, size in enumerate(per_layer):
            if size:
                kept[kind][layer] = size - _units_taken(geometry, steps, taken, kind, layer)
    return PricedCounts(
        experts,
        kept.get(GROUP_STAT),
        kept.get(SHARED_STAT),
        kept.get(CHANNEL_STAT),
        tuple(sorted(removed_layers)),
        removed_sublayers,
    )


_KIND_NAMES = {GROUP_STAT: "GQA groups", SHARED_STAT: "shared-MLP channels", CHANNEL_STAT: "expert channels"}


def _units_taken(geometry: ExpertGeometry, steps: dict, taken: dict, kind: str, layer: int) -> int:
    count = taken[kind, layer]
    return steps[kind, layer][count - 1] // _unit_params(geometry, kind, layer) if count else 0


def _split_counting_overlap(geometry: ExpertGeometry, curves: dict, steps: dict, target: float, wholes: dict) -> dict:
    """split_by_steps, with the target raised by what the candidates count twice: a channel step is priced at
    all of the layer's experts, so the channels of the experts the same plan removes are counted again. The
    target grows by that overlap until the plan removes what the ratios name (a few rounds)."""
    extra = 0.0
    for _ in range(8):
        taken = split_by_steps(curves, steps, target + extra, wholes)
        overlap = sum(
            taken[EXPERT_KIND, layer] * _units_taken(geometry, steps, taken, CHANNEL_STAT, layer)
            * geometry.params_per_channel
            for layer in geometry.moe_layers if (CHANNEL_STAT, layer) in steps
        )  # fmt: skip
        if overlap == extra:
            break
        extra = overlap
    return taken


def _unit_params(geometry: ExpertGeometry, kind: str, layer: int) -> int:
    """Parameters one unit of a width kind owns: a group, a shared channel, or a channel of every expert."""
    if kind == CHANNEL_STAT:
        return geometry.experts[layer] * geometry.params_per_channel
    return geometry.params_per_group if kind == GROUP_STAT else geometry.params_per_shared_channel


def _other(sublayer: str) -> str:
    return SUBLAYERS[1 - SUBLAYERS.index(sublayer)]


def _whole_candidates(scores: ExpertScores, curves: dict, steps: dict) -> dict:
    """``--whole-layers``: every measured sublayer (attention block, MoE block) and decoder layer joins the
    candidates (in place), one step each; returns each one's parts (what it contains: a sublayer its units, a
    layer its units and sublayers), for split_by_steps' ``wholes``."""
    geometry = scores.geometry
    if LAYER_KIND not in scores.width_curves or len(geometry.layer_params) != geometry.num_layers:
        raise GqaPruneError(
            "--whole-layers prices layers by measured loss curves; these scores lack them (re-run `gqa-prune "
            "importance` without --no-curves)"
        )
    wholes = {}
    units = {"attention": (GROUP_STAT,), "mlp": (EXPERT_KIND, SHARED_STAT, CHANNEL_STAT)}
    for index, name in enumerate(SUBLAYERS):
        for layer, curve in sorted(scores.width_curves.get(name, {}).items()):
            curves[name, layer], steps[name, layer] = curve.loss, [geometry.sublayer_params[layer][index]]
            wholes[name, layer] = [key for key in curves if key[0] in units[name] and key[1] == layer]
    for layer, curve in sorted(scores.width_curves[LAYER_KIND].items()):
        curves[LAYER_KIND, layer], steps[LAYER_KIND, layer] = curve.loss, [geometry.layer_params[layer]]
        wholes[LAYER_KIND, layer] = [key for key in curves if key[0] != LAYER_KIND and key[1] == layer]
    return wholes


def _ranked_counts(geometry: ExpertGeometry, ratio: float, layer_scores: dict[int, torch.Tensor]) -> dict[int, int]:
    """Per-layer counts: the ``round(ratio x all experts)`` lowest scores of all MoE layers go, each layer
    keeping at least top-k (ties: the later layer's expert goes first, then the higher index)."""
    total = sum(geometry.experts)
    remove = round(ratio * total)
    removable = sum(geometry.experts[layer] - geometry.top_k for layer in geometry.moe_layers)
    if remove > removable:
        raise GqaPruneError(
            f"--expert-ratio {ratio} removes {remove} of {total} experts, but every MoE layer keeps at least "
            f"{geometry.top_k} (num_experts_per_tok): at most {removable / total:.4g} is possible"
        )
    candidates = sorted(
        (
            (float(value), -layer, -index, layer)
            for layer, values in layer_scores.items()
            for index, value in enumerate(values.tolist())
        ),
    )
    counts = {layer: geometry.experts[layer] for layer in geometry.moe_layers}
    for _, _, _, layer in candidates:
        if remove == 0:
            break
        if counts[layer] > geometry.top_k:
            counts[layer] -= 1
            remove -= 1
    return counts


def _kept_channels(
    scores: ExpertScores,
    kept: tuple[tuple[int, ...], ...],
    settings: ExpertPlanSettings,
    whole_layers=(),
    widths: dict[int, int] | None = None,
) -> tuple[Channels, ...]:
    """Per layer, per kept expert, its highest-scored channels: ``widths[layer]`` of them where the per-layer
    pricing chose the widths, else ``width - round(channel_ratio x width)`` rounded down to ``channel_multiple``."""
    ratio, multiple = settings.channel_ratio, settings.channel_multiple
    result = []
    for layer, experts in enumerate(kept):
        width = scores.geometry.widths[layer]
        if layer in whole_layers:  # its MoE block goes whole: its experts are listed with all their channels
            result.append(tuple(tuple(range(width)) for _ in experts))
            continue
        keep = widths.get(layer, width) if widths is not None else (width - round(ratio * width)) // multiple * multiple
        if experts and keep < 1:
            raise GqaPruneError(
                f"--expert-channel-ratio {ratio} keeps no channel of layer {layer}'s {width}-channel experts in "
                f"multiples of {multiple} (--channel-multiple)"
            )
        channel_scores = scores.stats["channel"][layer] if experts else None
        result.append(tuple(top_units(channel_scores[expert], keep) for expert in experts))
    return tuple(result)


def load_plan(path: str | os.PathLike) -> PruningPlan | ExpertPlan:
    """Read a plan file written by `gqa-prune plan`: a unit plan or an expert plan."""
    path = Path(path)
    if not path.is_file():
        raise GqaPruneError(f"plan file {str(path)!r} does not exist (write it with `gqa-prune plan`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != EXPERT_PLAN_FORMAT:
        return PruningPlan.load(path)
    try:
        return ExpertPlan.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, GqaPruneError):
            raise
        raise GqaPruneError(f"plan file {str(path)!r} is malformed: {error}") from error
