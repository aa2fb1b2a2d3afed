"""Least-squares refit after an expert plan's width removals: what ``reconstruct`` does for dense models, for
the output projections of a mixture of experts whose inputs the plan cut.

Layer by layer, on the activations of the model masked and refit so far, each projection's kept columns are
refit by ridge least squares (``reconstruct.refit_columns``) so that it reproduces the unpruned projection's
output on the same inputs:

- ``o_proj`` after GQA groups went (its inputs: every query head's output);
- the shared expert's / shared MLP's output projection after shared channels went;
- each kept expert's down columns after expert channels went, on the tokens routed to that expert, each
  weighted by its squared gate (the layer adds ``gate x expert output``, so that is the layer's own error).

Whole experts are not refit (the router renormalises over the kept ones); a plan without groups or channels
changes nothing. The weights stay in the model's own tensors (removed columns zero), so ``apply_expert_plan``
afterwards slices refit weights. Grams are float64; one layer's exist at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import check_blocks
from .criteria.obs import greedy_obs_keep
from .errors import GqaPruneError
from .expert_plan import ExpertPlan
from .expert_surgery import check_expert_plan_fits, mask_expert_layer
from .moe import MoeFamily, attention_block, moe_family_for
from .passes import capture_layer_inputs, run_layer
from .reconstruct import output_error, refit_columns
from .settings import ReconstructionSettings

logger = logging.getLogger(__name__)


class _Statistics:
    """Input Grams of one layer's refit projections, accumulated over the calibration batches by hooks."""

    def __init__(self, experts: dict[int, tuple[int, ...]], family: MoeFamily):
        self.grams: dict[str, torch.Tensor] = {}
        self.expert_grams: dict[int, torch.Tensor] = {}
        self.experts, self.family = experts, family

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().flatten(0, -2).to(torch.float64)
        self.grams[name] = self.grams.get(name, 0) + x.T @ x

    def add_experts(self, module: nn.Module, args) -> None:
        """Pre-hook on the experts module: (hidden states, top-k expert indices, their gates)."""
        hidden, indices, gates = (arg.detach() for arg in args[:3])
        hidden, indices, gates = hidden.flatten(0, -2), indices.flatten(0, -2), gates.flatten(0, -2)
        for expert in self.experts:
            tokens, slot = (indices == expert).nonzero(as_tuple=True)
            if not len(tokens):
                continue
            activation = self.family.layout.activation(module, expert, hidden[tokens]).to(torch.float64)
            weighted = activation * gates[tokens, slot].to(torch.float64)[:, None]
            self.expert_grams[expert] = self.expert_grams.get(expert, 0) + weighted.T @ weighted


def _refit_targets(model: nn.Module, plan: ExpertPlan, index: int, layer: nn.Module) -> dict:
    """What this layer refits: name -> (the linear layer, its kept units, input columns per unit, units)."""
    family = moe_family_for(model.config)
    targets = {}
    if plan.cut_groups(index):
        geometry = plan.geometry
        width = geometry.heads_per_group * geometry.head_dim  # a group's query heads: contiguous o_proj columns
        targets["o_proj"] = (attention_block(layer).o_proj, plan.groups[index], width, geometry.kv_groups[index])
    if plan.cut_shared_channels(index):
        output = family.shared_mlp.output(family.shared_mlp.module(layer))
        targets["shared_output"] = (output, plan.shared_channels[index], 1, plan.geometry.shared_widths[index])
    return targets


def _expert_channels(plan: ExpertPlan, index: int) -> dict[int, tuple[int, ...]]:
    """Kept expert -> its kept channels, where the plan removes channels in this layer."""
    if not plan.cut_expert_channels(index):
        return {}
    width = plan.geometry.widths[index]
    return {
        expert: channels for expert, channels in zip(plan.kept[index], plan.channels[index]) if len(channels) < width
    }


def refit_expert_plan(
    model: nn.Module, plan: ExpertPlan, blocks: torch.Tensor, ridge: float, batch_size: int = 1, select: str = "obs"
) -> tuple[ExpertPlan, dict]:
    """Mask ``plan`` in ``model`` layer by layer and refit the kept columns of the projections it cut (in place).
    With ``select="obs"`` each cut projection keeps as many units (GQA groups, shared or expert channels) as the
    plan says, chosen by greedy structured OBS on the same Gram, as the dense refit does; "plan" keeps the
    plan's. Returns the plan as applied (slice with ``apply_expert_plan``) and a report with each projection's
    calibration error sliced and refit."""
    check_expert_plan_fits(plan, model)
    check_blocks(model, blocks)
    ReconstructionSettings(ridge=ridge, select=select, batch_size=batch_size).validate()  # the dense refit's rules
    family = moe_family_for(model.config)
    layers = family.decoder_layers(model)
    device = next(model.parameters()).device
    start = time.perf_counter()
    captured = capture_layer_inputs(model, layers, list(blocks.split(batch_size)), device)
    report, handles = [], []
    groups = list(plan.groups) if plan.groups is not None else None
    shared = list(plan.shared_channels) if plan.shared_channels is not None else None
    channels_kept = [list(layer) for layer in plan.channels] if plan.channels is not None else None
    try:
        for index, layer in enumerate(tqdm(layers, desc="refit experts", unit="layer")):
            targets = _refit_targets(model, plan, index, layer)
            channels = _expert_channels(plan, index)
            originals = {name: target[0].weight.detach().clone() for name, target in targets.items()}
            block = family.sparse_block(layer)
            expert_originals = {e: family.layout.down_columns(block.experts, e).detach().clone() for e in channels}
            layer_handles, _ = mask_expert_layer(model, plan, index)
            handles += layer_handles
            entry = {"layer": index}
            if (targets or channels) and index not in plan.removed_layers:
                statistics = _Statistics(channels, family)
                hooks = [
                    target[0].register_forward_pre_hook(lambda m, args, name=name: statistics.add(name, args[0]))
                    for name, target in targets.items()
                ]
                if channels:
                    hooks.append(block.experts.register_forward_pre_hook(statistics.add_experts))
                try:
                    with torch.no_grad():
                        for hidden, kwargs in zip(captured.hidden, captured.kwargs):
                            run_layer(layer, hidden, kwargs)
                finally:
                    for hook in hooks:
                        hook.remove()
                for name, (linear, units, width, total) in targets.items():
                    fit = _Fit(originals[name], statistics.grams[name], ridge, index, name)
                    kept_units, entry[name] = fit.write(linear.weight, fit.choose(units, width, total, select), width)
                    if name == "o_proj":
                        groups[index] = kept_units
                    else:
                        shared[index] = kept_units
                for expert, kept_channels in channels.items():
                    gram = statistics.expert_grams.get(expert)
                    if gram is None:  # no calibration token reached it: its kept columns stay as they were
                        continue
                    fit = _Fit(expert_originals[expert], gram, ridge, index, "expert")
                    chosen = fit.choose(kept_channels, 1, plan.geometry.widths[index], select)
                    columns = family.layout.down_columns(block.experts, expert)
                    kept_units, entry[f"expert {expert}"] = fit.write(columns, chosen, 1)
                    channels_kept[index][plan.kept[index].index(expert)] = kept_units
            with torch.no_grad():
                captured.hidden = [run_layer(layer, h, k) for h, k in zip(captured.hidden, captured.kwargs)]
            report.append(entry)
    finally:
        for handle in handles:
            handle.remove()
    applied = replace(
        plan,
        groups=None if groups is None else tuple(groups),
        shared_channels=None if shared is None else tuple(shared),
        channels=None if channels_kept is None else tuple(tuple(layer) for layer in channels_kept),
    )
    summary = {"ridge": ridge, "select": select, "calibration_tokens": int(blocks.numel()),
               "seconds": time.perf_counter() - start, "layers": report}  # fmt: skip
    return applied, summary


class _Fit:
    """One projection's refit: its original weight [out, in] and input Gram (float64)."""

    def __init__(self, original: torch.Tensor, gram: torch.Tensor, ridge: float, index: int, name: str):
        self.original, self.gram = original.to(gram.device, torch.float64), gram
        self.ridge, self.where = ridge, f"layer {index} {name}"

    def choose(self, units: tuple[int, ...], width: int, total: int, select: str) -> tuple[int, ...]:
        """The units to keep: the plan's, or as many chosen by greedy structured OBS."""
        if select != "obs":
            return tuple(units)
        try:
            kept = greedy_obs_keep(self.original, self.gram, width, total - len(units), ridge=self.ridge)
        except torch.linalg.LinAlgError as error:
            raise GqaPruneError(f"{self.where}: the OBS choice failed ({error}); try --select plan") from error
        return tuple(int(unit) for unit in kept)

    def write(self, weight: torch.Tensor, units: tuple[int, ...], width: int) -> tuple[tuple[int, ...], dict]:
        """Write the ridge refit of the kept units' columns into ``weight`` (a view), zero elsewhere."""
        kept = torch.as_tensor([unit * width + offset for unit in units for offset in range(width)])
        kept = kept.to(self.gram.device)
        try:
            refit = refit_columns(self.original, self.gram, kept, self.ridge)
        except torch.linalg.LinAlgError as error:
            raise GqaPruneError(f"{self.where}: the refit failed ({error}); try a larger --ridge") from error
        with torch.no_grad():
            weight.zero_()
            weight[:, kept] = refit.to(weight.dtype)
        return units, {
            "sliced_error": output_error(self.original, self.original[:, kept], self.gram, kept),
            "refit_error": output_error(self.original, refit, self.gram, kept),
        }


def summary_line(report: dict) -> str:
    """One paragraph for a model card: what was refit and how much the calibration error fell."""
    totals: dict[str, list[float]] = {}
    for entry in report["layers"]:
        for name, errors in entry.items():
            if name == "layer":
                continue
            kind = "expert down_proj" if name.startswith("expert ") else name
            total = totals.setdefault(kind, [0.0, 0.0])
            total[0] += errors["sliced_error"]
            total[1] += errors["refit_error"]
    parts = [
        f"{name}: {after / before:.1%} of the sliced model's output error"
        for name, (before, after) in totals.items()
        if before > 0
    ]
    return (
        f"The projections whose inputs the plan cut were refit by ridge least squares (ridge {report['ridge']}) on "
        f"{report['calibration_tokens']:,} calibration tokens, layer by layer: {'; '.join(parts) or 'nothing cut'}."
    )
