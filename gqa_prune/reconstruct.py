"""Least-squares reconstruction: after a plan's removals, refit the output projections that read from the
surviving units (o_proj columns of kept heads, down_proj columns of kept channels) so that each layer's
output on calibration activations stays as close as possible to the dense layer's. No gradient steps.

Layer by layer, in order, on the activations of the model pruned and refitted so far (as SparseGPT does),
so errors do not compound unseen. For an output projection W reading inputs X, with kept inputs K:

    W'_K = (W G[:, K] + lam W_K D) (G_KK + lam D)^-1,   G = sum over tokens of x x^T,  D = diag(G_KK)

the ridge least-squares fit of W X by W'_K X_K, pulled towards the original columns W_K (never towards 0)
by ``ridge`` relative to each input's own Gram diagonal. At ``ridge`` -> inf it is plain slicing, so the
fit never has a larger calibration error than slicing.

With ``select="obs"`` (the default) the plan fixes only how many units of each kind a layer loses: which
ones go is chosen just before the refit by greedy structured OBS on the same Gram (ZipLM, SlimGPT), scoring
each removal by the exact rise of the refit's own ridge objective, so the layer loses what the refit can
best make up for. With ``target="dense"`` the layer instead matches
the dense model's own output on the dense model's activations, which also absorbs what upstream removals
(sublayers, layers) took away.

With ``inputs`` (the full sequential refit) the projections that read the residual stream (q/k/v, gate/up)
are refit too, before their sublayer's output projection: all their rows, towards the dense model's outputs
on the dense model's activations, from the pruned model's inputs (the same ridge pull towards the original
weights), so what upstream removals shifted is corrected where it enters each sublayer. With nothing removed
the inputs equal the dense ones and the fit returns the original weights. Grams accumulate in float64
whatever the model dtype; only one layer's Grams exist at a time (an 8B model's down_proj Gram is 14336^2
float64 = 1.6 GB).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ATTENTION_ROLES, MLP_ROLES, FamilyAdapter, Geometry, adapter_for
from .blocks import check_blocks
from .criteria.obs import DIAGONAL_FLOOR, greedy_obs_keep
from .errors import GqaPruneError
from .passes import OUTPUT_ROLE, LayerInputs, capture_layer_inputs, run_layer
from .planning import LayerPlan, PruningPlan
from .settings import ReconstructionSettings
from .surgery import check_plan_fits, mask_layer
from .units import GQA_GROUP, LAYER, MLP_CHANNEL, WIDTH_KINDS, WidthKind

logger = logging.getLogger(__name__)


def refit_columns(
    weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float, cross: torch.Tensor | None = None
) -> torch.Tensor:
    """The refitted kept columns W'_K (float64) of ``weight`` [out, in] given the input Gram [in, in].

    ``cross`` (X_K^T Y, [K, out]) replaces the own-output target W G[:, K] when the target is another output.
    """
    original = weight.detach().to(torch.float64)
    gram_kept = gram[kept][:, kept]
    diagonal = gram_kept.diagonal()
    floor = DIAGONAL_FLOOR * max(float(diagonal.mean()), 1e-30)
    damping = ridge * diagonal.clamp(min=floor)
    system = gram_kept + torch.diag(damping)
    right = (original @ gram[:, kept]).T if cross is None else cross
    right = right + damping.unsqueeze(1) * original[:, kept].T
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise torch.linalg.LinAlgError("Gram matrix is not positive definite")
    return torch.cholesky_solve(right, factor).T


def _checked_refit(
    original: torch.Tensor,
    gram: torch.Tensor,
    kept: torch.Tensor,
    ridge: float,
    cross: torch.Tensor | None,
    layer: int,
    name: str,
) -> torch.Tensor:
    """``refit_columns``, with a singular Gram or a non-finite result refused in one line naming the layer and
    the projection."""
    try:
        refit = refit_columns(original, gram, kept, ridge, cross)
    except torch.linalg.LinAlgError as error:
        raise GqaPruneError(
            f"layer {layer}: the Gram matrix of {name} is singular even with ridge {ridge}; raise --ridge or give more "
            f"calibration text"
        ) from error
    if not torch.isfinite(refit).all():
        raise GqaPruneError(f"layer {layer}: the refit of {name} is not finite (NaN/Inf)")
    return refit


def output_error(weight: torch.Tensor, refit: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """Calibration error sum ||W x - W' x_K||^2 of the own-output target, from the Gram alone."""
    original = weight.detach().to(torch.float64)
    difference = original.clone()
    difference[:, kept] -= refit
    return float(torch.einsum("oi,ij,oj->", difference, gram, difference))


def _gram(
    layer: nn.Module,
    projection: nn.Linear,
    captured: LayerInputs,
    dense: tuple[nn.Module, nn.Linear, list[torch.Tensor]] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input Gram of ``projection`` over the calibration batches (float64), and X^T Y_dense if ``dense``."""
    gram, cross, inputs = None, None, []
    handle = projection.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    dense_outputs: list[torch.Tensor] = []
    dense_handle = None
    if dense is not None:
        bias = dense[1].bias  # the refit keeps the bias: match the output without it
        dense_handle = dense[1].register_forward_hook(
            lambda m, args, output: dense_outputs.append(output.detach() - (0 if bias is None else bias.detach()))
        )
    try:
        with torch.no_grad():
            for index, (hidden, kwargs) in enumerate(zip(captured.hidden, captured.kwargs)):
                run_layer(layer, hidden, kwargs)
                x = inputs.pop().flatten(0, -2).to(torch.float64)
                gram = x.T @ x if gram is None else gram + x.T @ x
                if dense is not None:
                    run_layer(dense[0], dense[2][index], kwargs)
                    y = dense_outputs.pop().flatten(0, -2).to(torch.float64)
                    part = x.T @ y
                    cross = part if cross is None else cross + part
    finally:
        handle.remove()
        if dense_handle is not None:
            dense_handle.remove()
    return gram, cross


INPUT_ROLES = {"attn": ATTENTION_ROLES[:3], "mlp": MLP_ROLES[:2]}  # q/k/v and gate/up: read the stream


def _input_statistics(
    layer: nn.Module,
    dense_layer: nn.Module,
    projections: list[tuple[nn.Linear, nn.Linear]],
    captured: LayerInputs,
    dense_hidden: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """For projections that share one input: its Gram on the pruned model's activations (float64), and per
    projection X^T Y and sum ||y||^2 of the dense projection's output (bias excluded) on the dense activations."""
    inputs: list[torch.Tensor] = []
    outputs: list[list[torch.Tensor]] = [[] for _ in projections]
    handles = [projections[0][0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))]
    for index, (_, dense) in enumerate(projections):
        bias = dense.bias
        handles.append(dense.register_forward_hook(
            lambda m, args, output, store=outputs[index], bias=bias:
            store.append(output.detach() - (0 if bias is None else bias.detach()))
        ))  # fmt: skip
    gram = None
    crosses: list[torch.Tensor | None] = [None] * len(projections)
    energies = [0.0] * len(projections)
    try:
        with torch.no_grad():
            for hidden, dense_in, kwargs in zip(captured.hidden, dense_hidden, captured.kwargs):
                run_layer(layer, hidden, kwargs)
                run_layer(dense_layer, dense_in, kwargs)
                x = inputs.pop().flatten(0, -2).to(torch.float64)
                gram = x.T @ x if gram is None else gram + x.T @ x
                for index, store in enumerate(outputs):
                    y = store.pop().flatten(0, -2).to(torch.float64)
                    part = x.T @ y
                    crosses[index] = part if crosses[index] is None else crosses[index] + part
                    energies[index] += float((y * y).sum())
    finally:
        for handle in handles:
            handle.remove()
    return gram, crosses, energies


def _target_error(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: float) -> float:
    """sum ||W x - y||^2 over the calibration tokens, from the Gram, X^T Y and sum ||y||^2 alone."""
    return float(torch.einsum("oi,ij,oj->", weight, gram, weight) - 2 * torch.einsum("oi,io->", weight, cross)) + energy


def refit_inputs(
    layer: nn.Module,
    dense_layer: nn.Module,
    scope: str,
    adapter: FamilyAdapter,
    captured: LayerInputs,
    dense_hidden: list[torch.Tensor],
    ridge: float,
    index: int,
) -> dict[str, dict[str, float]]:
    """Refit every row of a sublayer's input projections (q/k/v or gate/up) in place towards the dense model's
    outputs; returns each projection's calibration error before and after."""
    projections = [
        (adapter.projection(layer, role), adapter.projection(dense_layer, role)) for role in INPUT_ROLES[scope]
    ]
    gram, crosses, energies = _input_statistics(layer, dense_layer, projections, captured, dense_hidden)
    every = torch.arange(gram.shape[0], device=gram.device)
    report = {}
    for role, (projection, _), cross, energy in zip(INPUT_ROLES[scope], projections, crosses, energies):
        original = projection.weight.detach().to(torch.float64)
        refit = _checked_refit(original, gram, every, ridge, cross, index, role.module)
        report[role.module] = {
            "before_error": _target_error(original, gram, cross, energy),
            "refit_error": _target_error(refit, gram, cross, energy),
        }
        with torch.no_grad():
            projection.weight.copy_(refit.to(projection.weight.dtype))
    return report


def reconstruct(
    model: nn.Module,
    plan: PruningPlan,
    blocks: torch.Tensor,
    settings: ReconstructionSettings | None = None,
) -> tuple[PruningPlan, dict]:
    """Mask the plan's removals in ``model`` (in place) and refit the kept columns of every output projection
    layer by layer. Returns the plan as applied (with ``select="obs"`` each layer keeps as many units as the
    plan says, chosen by OBS; give it to ``surgery.apply_plan`` to slice the masked model) and a report."""
    settings = settings or ReconstructionSettings()
    settings.validate()
    geometry = check_plan_fits(plan, model)
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    check_blocks(model, blocks)
    tokens = int(blocks.numel())
    widest = max(
        (len(layer.kept.get(kind.name, ())) * geometry.indices_per_unit(OUTPUT_ROLE[kind.scopes[0]])
         for layer in plan.layers for kind in WIDTH_KINDS if layer.keeps(kind.scopes[0])),
        default=0,
    )  # fmt: skip
    if tokens < widest:
        raise GqaPruneError(
            f"calibration has {tokens:,} tokens but the refit of a projection with {widest:,} kept inputs needs at "
            f"least that many (more blocks or longer ones)"
        )
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = list(blocks.split(settings.batch_size))
    captured = capture_layer_inputs(model, layers, batches, device)
    follow_dense = settings.target == "dense" or settings.inputs  # the dense model's stream, alongside
    dense_hidden = [hidden.clone() for hidden in captured.hidden] if follow_dense else None
    reselect = settings.select == "obs" and plan.settings.mode != "learned"
    if settings.select == "obs" and not reselect:
        logger.info("the plan keeps the units of learned masks: reconstruction does not re-choose them")
    report, applied = [], []
    for index, (layer, layer_plan) in enumerate(tqdm(list(zip(layers, plan.layers)), desc="reconstruct", unit="layer")):
        dense_layer = copy.deepcopy(layer) if follow_dense else None
        entry = {"layer": index}
        kept_units = dict(layer_plan.kept)
        if layer_plan.removes_layer:
            with torch.no_grad():
                LAYER.mask(layer, adapter)  # the layer adds nothing: the stream passes it
        else:
            originals = {}
            for scope in ("attn", "mlp"):
                if adapter.sublayer(layer, scope) is not None:
                    originals[scope] = adapter.projection(layer, OUTPUT_ROLE[scope]).weight.detach().clone()
            mask_layer(layer, layer_plan, adapter, geometry)
            for kind in (GQA_GROUP, MLP_CHANNEL):
                scope = kind.scopes[0]
                if not layer_plan.keeps(scope):
                    continue
                if settings.inputs:
                    entry.update(refit_inputs(
                        layer, dense_layer, scope, adapter, captured, dense_hidden, settings.ridge, index
                    ))  # fmt: skip
                projection = adapter.projection(layer, OUTPUT_ROLE[scope])
                dense = None
                if settings.target == "dense":
                    dense = (dense_layer, adapter.projection(dense_layer, OUTPUT_ROLE[scope]), dense_hidden)
                gram, cross = _gram(layer, projection, captured, dense)
                original = originals[scope].to(gram.device)
                units, changed = _select(kind, layer_plan, geometry, original, gram, reselect, settings.ridge)
                kept_units[kind.name] = units
                kept = kind.kept_indices(OUTPUT_ROLE[scope], geometry, units).to(gram.device)
                refit = _checked_refit(original, gram, kept, settings.ridge, None if cross is None else cross[kept],
                                       index, projection_name(scope))  # fmt: skip
                plain = output_error(original, original[:, kept], gram, kept)
                fitted = output_error(original, refit, gram, kept)
                with torch.no_grad():
                    weight = torch.zeros_like(projection.weight)
                    weight[:, kept] = refit.to(weight.dtype)
                    projection.weight.copy_(weight)
                entry[projection_name(scope)] = {
                    "sliced_error": plain, "refit_error": fitted, "kept_inputs": len(kept), "units_changed": changed
                }  # fmt: skip
                logger.debug(
                    "layer %d %s: output error %.4g sliced -> %.4g refit", index, projection_name(scope), plain, fitted
                )
                del gram, cross
        with torch.no_grad():
            captured.hidden = [run_layer(layer, h, k) for h, k in zip(captured.hidden, captured.kwargs)]
            if dense_hidden is not None:
                dense_hidden = [run_layer(dense_layer, h, k) for h, k in zip(dense_hidden, captured.kwargs)]
        report.append(entry)
        applied.append(replace(layer_plan, kept=kept_units))
    summary = {
        "settings": asdict(settings),
        "reselected": reselect,
        "calibration_tokens": tokens,
        "seconds": time.perf_counter() - start,
        "layers": report,
    }
    if device.type == "cuda":
        summary["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return replace(plan, layers=tuple(applied)), summary


def _select(
    kind: WidthKind,
    layer_plan: LayerPlan,
    geometry: Geometry,
    original: torch.Tensor,
    gram: torch.Tensor,
    reselect: bool,
    ridge: float,
) -> tuple[tuple[int, ...], int]:
    """The units of ``kind`` this layer keeps, and how many of them the plan had removed: the plan's own, or
    as many chosen by greedy structured OBS on the Gram of the pruned model's inputs (scored by the exact
    rise of the refit's ridge objective)."""
    planned = tuple(layer_plan.kept[kind.name])
    count = kind.count(geometry, layer_plan.layer)
    if not reselect or len(planned) == count:
        return planned, 0
    width = geometry.indices_per_unit(OUTPUT_ROLE[kind.scopes[0]])
    try:
        kept = greedy_obs_keep(original, gram, width, count - len(planned), ridge=ridge)
    except torch.linalg.LinAlgError as error:
        raise GqaPruneError(
            f"layer {layer_plan.layer}: the OBS choice of {kind.name} units failed ({error}); try --select plan, a "
            f"larger --ridge or more calibration text"
        ) from error
    units = tuple(int(unit) for unit in kept)
    return units, len(set(units) - set(planned))


def projection_name(scope: str) -> str:
    return OUTPUT_ROLE[scope].module


def summary_line(report: dict) -> str:
    """One paragraph for a model card: what was refit, how, and how much the calibration error fell."""
    settings = report["settings"]
    totals = {"o_proj": [0.0, 0.0], "down_proj": [0.0, 0.0]}
    changed = 0
    for entry in report["layers"]:
        for name, total in totals.items():
            if name in entry:
                total[0] += entry[name]["sliced_error"]
                total[1] += entry[name]["refit_error"]
                changed += entry[name].get("units_changed", 0)
    parts = [
        f"{name}: {after / before:.1%} of the sliced model's output error"
        for name, (before, after) in totals.items()
        if before > 0
    ]
    inputs = [0.0, 0.0]
    for entry in report["layers"]:
        for role in (*INPUT_ROLES["attn"], *INPUT_ROLES["mlp"]):
            if role.module in entry:
                inputs[0] += entry[role.module]["before_error"]
                inputs[1] += entry[role.module]["refit_error"]
    if inputs[0] > 0:
        parts.append(f"q/k/v and gate/up (refit towards the dense model's outputs): {inputs[1] / inputs[0]:.1%} of "
                     f"their error before the refit")  # fmt: skip
    rows = " (and every row of q/k/v, gate/up)" if settings.get("inputs") else ""
    chosen = (
        f"Each layer kept as many GQA groups and MLP channels as the plan says, chosen by greedy structured OBS on "
        f"the pruned model's activations ({changed} units differ from the plan's). "
        if report.get("reselected")
        else ""
    )
    return (
        chosen
        + f"The kept columns of every o_proj and down_proj{rows} were refit layer by layer by ridge least squares "
        f"(ridge {settings['ridge']} relative to each input's Gram diagonal, target `{settings['target']}`) on "
        f"{report['calibration_tokens']:,} calibration tokens, in {report['seconds']:.0f} s; "
        + ("; ".join(parts) or "nothing was removed")
        + "."
    )
