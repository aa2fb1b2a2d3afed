"""Plot a plan: per layer, kept KV groups and MLP channels against the layer importance it was built from (or an
expert plan's kept experts and widths); training loss curves; Pareto fronts."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_file, marked  # noqa: E402
from .planning import PruningPlan  # noqa: E402

PLOT_KIND = "plot"  # the sub-command named in a drawing's marker (``plan --plot`` draws the same PNG)


def _save(figure, out_png: str | os.PathLike, kind: str) -> None:
    """Write the figure atomically as PNG, marked (a text chunk) as the output of sub-command ``kind``."""
    figure.tight_layout()
    with atomic_file(out_png, kind) as temporary:
        figure.savefig(temporary, format="png", dpi=110, metadata=marked({}, kind))
    plt.close(figure)


def plot_plan(plan: PruningPlan, out_png: str | os.PathLike, title: str | None = None, kind: str = PLOT_KIND) -> None:
    """Per layer: kept KV groups and MLP channels against layer importance; removed layers and sublayers marked."""
    layers = list(range(plan.geometry.num_layers))
    importance = [layer.importance for layer in plan.layers]
    settings = plan.settings
    summary = plan.param_summary()
    kept_groups = [len(layer.kept_kv_groups) if layer.keeps("attn") else 0 for layer in plan.layers]
    kept_channels = [len(layer.kept_mlp_channels) if layer.keeps("mlp") else 0 for layer in plan.layers]

    figure, (attention_axis, mlp_axis) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2), 6.5), sharex=True
    )
    panels = (
        (attention_axis, plan.geometry.kv_groups, kept_groups, "KV groups kept", "tab:blue", "attn"),
        (mlp_axis, plan.geometry.intermediate_sizes, kept_channels, "MLP channels kept", "tab:green", "mlp"),
    )
    for axis, dense, kept, label, colour, scope in panels:
        axis.bar(layers, dense, color="lightgrey", label="dense")
        axis.bar(layers, kept, color=colour, label="kept")
        gone = [layer.layer for layer in plan.layers if not layer.keeps(scope) and not layer.removes_layer]
        if gone:
            axis.scatter(gone, [0.5 * max(dense)] * len(gone), marker="x", color="black", zorder=3,
                         label=f"{'attention' if scope == 'attn' else 'MLP'} sublayer removed")  # fmt: skip
        axis.set_ylabel(label)
        importance_axis = axis.twinx()
        importance_axis.plot(layers, importance, color="tab:red", marker=".", linewidth=1)
        importance_axis.set_ylabel(f"layer importance\n({settings.layer_criterion})", color="tab:red")
        for index in settings.protected_layers:
            axis.axvspan(index - 0.5, index + 0.5, color="gold", alpha=0.25, linewidth=0)
        for layer in plan.layers:
            if layer.removes_layer:
                axis.axvspan(layer.layer - 0.5, layer.layer + 0.5, color="tab:red", alpha=0.15, linewidth=0)
        axis.legend(loc="lower left", fontsize="small")
    notes = [note for flag, note in ((settings.protected_layers, "gold: protected"),
                                     (summary["layers_removed"], "red: layer removed")) if flag]  # fmt: skip
    mlp_axis.set_xlabel("decoder layer" + (f" ({'; '.join(notes)})" if notes else ""))
    attention_axis.set_title(
        title
        or f"{settings.criterion} / {settings.mode if settings.mode != 'width' else settings.strategy}: removed "
        f"{summary['achieved_ratio']:.1%} of attention+MLP (attn {summary['achieved_attn_ratio']:.1%}, "
        f"MLP {summary['achieved_mlp_ratio']:.1%})",
        fontsize="medium",
    )
    _save(figure, out_png, kind)


def plot_expert_plan(plan, out_png: str | os.PathLike, title: str | None = None, kind: str = PLOT_KIND) -> None:
    """Per decoder layer: experts kept of the dense count, and channels each kept expert keeps (an ExpertPlan)."""
    before, after = plan.geometry, plan.pruned_geometry()
    layers = list(range(before.num_layers))
    figure, (experts_axis, widths_axis) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2), 6.0), sharex=True
    )
    for axis, dense, kept, label, colour in (
        (experts_axis, before.experts, after.experts, "routed experts kept", "tab:purple"),
        (widths_axis, before.widths, after.widths, "channels per expert", "tab:green"),
    ):
        axis.bar(layers, dense, color="lightgrey", label="dense")
        axis.bar(layers, kept, color=colour, label="kept")
        axis.set_ylabel(label)
        axis.legend(loc="lower left", fontsize="small")
    experts_axis.axhline(before.top_k, color="black", linewidth=0.8, linestyle=":", label="top-k")
    widths_axis.set_xlabel("decoder layer (no bar: a dense MLP layer)")
    summary = plan.summary()
    experts_axis.set_title(
        title
        or f"{plan.criterion} / experts {plan.allocation}: removed {summary['achieved_expert_ratio']:.1%} of the "
        f"experts ({summary['params_before']:,} -> {summary['params_after']:,} parameters)",
        fontsize="medium",
    )
    _save(figure, out_png, kind)


def plot_loss_curve(
    steps: list[int], losses: list[float], out_png: str | os.PathLike, title: str, kind: str = PLOT_KIND
) -> None:
    """Training loss per step, with a moving average when there are enough steps."""
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    axis.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.5 if len(steps) > 20 else 1.0, label="loss")
    window = max(1, len(steps) // 10)
    if window > 1:
        smoothed = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        axis.plot(steps, smoothed, color="tab:red", linewidth=1.5, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title, fontsize="medium")
    axis.legend(fontsize="small")
    _save(figure, out_png, kind)


def plot_pareto(
    labels: list[str],
    xs: list[float],
    ys: list[float],
    on_front: list[bool],
    x_label: str,
    y_label: str,
    out_png: str | os.PathLike,
    kind: str,
    log_y: bool = False,
) -> None:
    """Every variant as a labelled point; the Pareto front highlighted and joined."""
    figure, axis = plt.subplots(figsize=(7.5, 5.0))
    axis.scatter(xs, ys, color="lightgrey", edgecolor="grey", zorder=2, label="variant")
    front = sorted((x, y) for x, y, keep in zip(xs, ys, on_front) if keep)
    if front:
        axis.plot([x for x, _ in front], [y for _, y in front], color="tab:green", marker="o", zorder=3,
                  label="Pareto front")  # fmt: skip
    for label, x, y, keep in zip(labels, xs, ys, on_front):
        axis.annotate(label, (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points",
                      color="black" if keep else "grey")  # fmt: skip
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    _save(figure, out_png, kind)
