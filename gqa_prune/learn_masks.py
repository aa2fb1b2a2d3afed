"""Learned pruning (criterion ``l0``): hard-concrete masks over every unit kind, trained to a target size.

Sheared-LLaMA's recipe, made GQA-aware: one hard-concrete mask (``hard_concrete``) per GQA group (shared by
the group's query heads and its KV head), MLP channel, attention sublayer, MLP sublayer and layer. Sampled
masks multiply each unit's contribution to the residual stream through ``passes.unit_masks`` (hooks; the
model's code is untouched). The training objective is::

    loss = LM loss(masked model) + lambda1 * gap + lambda2 * gap^2
    gap  = E[remaining attention+MLP parameters] / all of them - (1 - target ratio)

where the expectation has a closed form (products of P(z > 0) of a unit and of the sublayer and layer it lives
in). The mask log-alphas descend the loss (Adam); the multipliers lambda1, lambda2 *ascend* it (gradient
ascent: d/dlambda1 = gap, d/dlambda2 = gap^2), so any lasting gap is priced up until the expected size sits on
the target. The target ratio rises linearly from 0 over ``warmup_steps``. Weights stay frozen (masks only)
unless ``train_weights`` is ``full`` or ``lora``; then the trained weights are written beside the masks.

The result is an importance folder: keep-scores = learned log-alphas (width kinds in ``units``, sublayers and
layers under the structural criterion ``l0``), the final deterministic 0/1 masks (``Scores.masks``), the
block influence of the dense model (so every plan mode works), ``training.csv`` and ``training.png``.
A plan of mode ``learned`` keeps exactly the units whose deterministic mask is 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Geometry, adapter_for, geometry_of
from .blocks import check_blocks
from .errors import GqaPruneError
from .hard_concrete import HardConcrete, deterministic_count, kept_sizes, top_k_mask
from .mask_settings import CRITERION, TRAINED_WEIGHTS_DIR, MaskSettings
from .passes import StructuralStatsCollector, frozen, unit_masks
from .planning import SIZE_TOLERANCE
from .scores import Scores
from .units import KINDS, WIDTH_KINDS, width_kind

logger = logging.getLogger(__name__)
MIN_BLOCK_TOKENS = 8  # several next-token targets per block: masks learned on 1-2 tokens a block learn noise

FINAL_LR_FACTOR = 0.05  # the mask learning rate decays to this fraction after the warm-up


@dataclass(frozen=True)
class TrainingStep:
    step: int
    loss: float  # LM loss of the model under the sampled masks
    lagrangian: float  # lambda1 * gap + lambda2 * gap^2
    target_ratio: float
    expected_ratio: float  # of attention+MLP parameters removed, in expectation under the masks
    lambda1: float
    lambda2: float
    tokens: int
    seconds: float


@dataclass
class LearnedMasks:
    scores: Scores  # criterion l0: log-alphas as keep-scores, deterministic masks in ``scores.masks``
    history: list[TrainingStep]
    trained_model: nn.Module | None = None  # the model with its trained weights (train_weights != none)
    settings: MaskSettings | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- masks
class MaskParameters(nn.Module):
    """One log-alpha per unit of each learned kind and layer (a GQA group has one, shared by its heads)."""

    def __init__(self, geometry: Geometry, kinds, init_log_alpha: float):
        super().__init__()
        self.geometry = geometry
        self.kinds = tuple(kind for kind in KINDS if kind in kinds)  # registry order
        self.log_alpha = nn.ParameterDict(
            {
                key(kind, layer): nn.Parameter(torch.full((KINDS[kind].count(geometry, layer),), init_log_alpha))
                for kind in self.kinds
                for layer in range(geometry.num_layers)
                if KINDS[kind].count(geometry, layer)
            }
        )

    def get(self, kind: str, layer: int) -> torch.Tensor | None:
        return self.log_alpha[key(kind, layer)] if key(kind, layer) in self.log_alpha else None

    def sample(self, distribution: HardConcrete, generator: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
        """layer -> kind -> a differentiable sample per unit (what ``unit_masks`` multiplies in)."""
        masks: dict[int, dict[str, torch.Tensor]] = {}
        for name, log_alpha in self.log_alpha.items():
            kind, layer = split_key(name)
            masks.setdefault(layer, {})[kind] = distribution.sample(log_alpha, generator)
        return masks

    def expected_remaining(self, distribution: HardConcrete) -> torch.Tensor:
        """E[attention+MLP projection parameters kept], in closed form (independent masks: products)."""
        geometry = self.geometry
        total = torch.zeros((), device=next(self.parameters()).device)
        for layer in range(geometry.num_layers):
            whole = self._keep_probability("layer", layer, distribution)
            for scope in ("attn", "mlp"):
                kind = width_kind(scope)
                units = kind.count(geometry, layer)
                if not units:
                    continue
                sublayer = self._keep_probability(f"{scope}_sublayer", layer, distribution)
                log_alpha = self.get(kind.name, layer)
                kept_units = distribution.prob_nonzero(log_alpha).sum() if log_alpha is not None else units
                total = total + whole * sublayer * kept_units * kind.params_per_unit(geometry, layer)
        return total

    def _keep_probability(self, kind: str, layer: int, distribution: HardConcrete) -> torch.Tensor | float:
        log_alpha = self.get(kind, layer)
        return 1.0 if log_alpha is None else distribution.prob_nonzero(log_alpha).reshape(())


def key(kind: str, layer: int) -> str:
    """Parameter name of one layer's log-alphas of one kind (module parameter names take no dots)."""
    return f"{kind}__{layer}"


def split_key(name: str) -> tuple[str, int]:
    kind, _, layer = name.rpartition("__")
    return kind, int(layer)


def max_ratio(geometry: Geometry, kinds, channel_multiple: int) -> float:
    """The largest ratio masks of ``kinds`` can reach while some layer keeps attention and some an MLP."""
    minimum_kept = 0
    for scope in ("attn", "mlp"):
        kind = width_kind(scope)
        whole_gone = bool({"layer", f"{scope}_sublayer"} & set(kinds))
        smallest = []  # per layer with this sublayer: the fewest parameters it can keep while keeping it
        for layer in range(geometry.num_layers):
            units = kind.count(geometry, layer)
            if not units:
                continue
            fewest = units
            if kind.name in kinds:
                fewest = min(size for size in kept_sizes(units, channel_multiple if scope == "mlp" else 1) if size)
            smallest.append(fewest * kind.params_per_unit(geometry, layer))
        minimum_kept += min(smallest) if whole_gone else sum(smallest)
    return 1.0 - minimum_kept / geometry.unit_params()


def deterministic_masks(
    parameters: MaskParameters, distribution: HardConcrete, channel_multiple: int, ratio: float | None = None
) -> dict[str, list[torch.Tensor]]:
    """The final 0/1 masks of every kind (kinds without masks are all 1).

    A sublayer or layer stays when P(z > 0) >= 0.5. A layer keeps, of its GQA groups (MLP channels), the
    allowed count nearest their expected L0 (channels in multiples of ``channel_multiple``), highest log-alpha
    first. Removal propagates (a sublayer keeping no unit goes; a layer with neither sublayer goes; the parts
    of what goes go with it). With ``ratio``, the counts are then nudged to the target size (``_snap``):
    rounding every unit's expectation on its own can miss the size the expectations add up to.
    """
    geometry = parameters.geometry
    keep: list[dict[str, int]] = []  # per layer: structural kind -> 0/1, width kind -> units kept
    with torch.no_grad():
        for layer in range(geometry.num_layers):
            counts = {}
            for name in ("layer", "attn_sublayer", "mlp_sublayer"):
                log_alpha = parameters.get(name, layer)
                present = KINDS[name].count(geometry, layer)
                probability = 1.0 if log_alpha is None else float(distribution.prob_nonzero(log_alpha))
                counts[name] = present * deterministic_count(probability, 1)
            for kind in WIDTH_KINDS:
                units, log_alpha = kind.count(geometry, layer), parameters.get(kind.name, layer)
                expected = units if log_alpha is None else float(distribution.prob_nonzero(log_alpha).sum())
                counts[kind.name] = deterministic_count(expected, units, _multiple(kind, channel_multiple))
            _make_consistent(counts, geometry, layer)
            keep.append(counts)
        if ratio is not None:
            _snap(keep, parameters, geometry, ratio, channel_multiple)
        masks: dict[str, list[torch.Tensor]] = {name: [] for name in KINDS}
        for layer, counts in enumerate(keep):
            for name in KINDS:
                units = KINDS[name].count(geometry, layer)
                log_alpha = parameters.get(name, layer) if name in {k.name for k in WIDTH_KINDS} else None
                if log_alpha is None:
                    masks[name].append(torch.full((units,), 1.0 if counts[name] else 0.0))
                else:
                    masks[name].append(top_k_mask(log_alpha, counts[name]))
    _check_some_layer_keeps(masks)
    return masks


def _multiple(kind, channel_multiple: int) -> int:
    return channel_multiple if kind.scopes == ("mlp",) else 1


def _make_consistent(counts: dict[str, int], geometry: Geometry, layer: int) -> None:
    """Removal propagates: no units -> no sublayer -> no layer, and a removed whole removes its parts."""
    for scope in ("attn", "mlp"):
        if KINDS[f"{scope}_sublayer"].count(geometry, layer) and not counts[width_kind(scope).name]:
            counts[f"{scope}_sublayer"] = 0
    present = [scope for scope in ("attn", "mlp") if KINDS[f"{scope}_sublayer"].count(geometry, layer)]
    if not any(counts[f"{scope}_sublayer"] for scope in present):
        counts["layer"] = 0
    if not counts["layer"]:
        counts["attn_sublayer"] = counts["mlp_sublayer"] = 0
    for scope in ("attn", "mlp"):
        if not counts[f"{scope}_sublayer"]:
            counts[width_kind(scope).name] = 0


def _snap(keep: list[dict[str, int]], parameters: MaskParameters, geometry: Geometry, ratio: float, multiple: int):
    """Move kept counts of learned width kinds, one allowed step at a time, towards the target size: drop the
    step whose units have the lowest log-alpha (or add back the highest) until the size is within
    ``SIZE_TOLERANCE`` or no step brings it closer. Sublayers and layers stay as decided."""
    ordered = {}  # (kind, layer) -> log-alphas, descending
    for layer in range(geometry.num_layers):
        for kind in WIDTH_KINDS:
            log_alpha = parameters.get(kind.name, layer)
            if log_alpha is not None and keep[layer][kind.name]:
                ordered[(kind.name, layer)] = sorted(log_alpha.detach().float().cpu().tolist(), reverse=True)
    target = (1.0 - ratio) * geometry.unit_params()

    def kept_params() -> int:
        return sum(
            keep[layer][kind.name] * kind.params_per_unit(geometry, layer)
            for layer in range(geometry.num_layers)
            for kind in WIDTH_KINDS
        )

    while abs(kept_params() - target) > SIZE_TOLERANCE * target:
        excess = kept_params() - target
        best = None
        for (name, layer), values in ordered.items():
            kind, count = KINDS[name], keep[layer][name]
            sizes = [size for size in kept_sizes(len(values), _multiple(kind, multiple)) if size]
            options = (
                [size for size in sizes if size < count] if excess > 0 else [size for size in sizes if size > count]
            )
            if not options:
                continue
            new = max(options) if excess > 0 else min(options)
            moved = values[new:count] if excess > 0 else values[count:new]
            score = sum(moved) / len(moved)
            if best is None or (score < best[0] if excess > 0 else score > best[0]):
                best = (score, name, layer, new)
        if best is None:
            return
        _, name, layer, new = best
        change = (new - keep[layer][name]) * KINDS[name].params_per_unit(geometry, layer)
        if abs(excess + change) >= abs(excess):
            return
        keep[layer][name] = new


def _check_some_layer_keeps(masks: dict[str, list[torch.Tensor]]) -> None:
    for scope, name in (("attn", "attention"), ("mlp", "MLP")):
        if not any(mask.any() for mask in masks[width_kind(scope).name]):
            raise GqaPruneError(
                f"the learned masks remove every {name} sublayer; a smaller --ratio or more --steps is needed"
            )


def as_unit_masks(masks: dict[str, list[torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """kind -> per-layer masks  =>  layer -> kind -> mask (what ``unit_masks`` takes; empty kinds left out)."""
    table: dict[int, dict[str, torch.Tensor]] = {}
    for name, per_layer in masks.items():
        for layer, mask in enumerate(per_layer):
            if len(mask):
                table.setdefault(layer, {})[name] = mask
    return table


def removed_ratio(geometry: Geometry, masks: dict[str, list[torch.Tensor]]) -> float:
    """Fraction of attention+MLP parameters that consistent deterministic masks remove."""
    kept = 0
    for layer in range(geometry.num_layers):
        for scope in ("attn", "mlp"):
            kind = width_kind(scope)
            kept += int(masks[kind.name][layer].sum()) * kind.params_per_unit(geometry, layer)
    return 1.0 - kept / geometry.unit_params()


# ----------------------------------------------------------------------------------------------- training
def _target(settings: MaskSettings, step: int) -> float:
    """The ratio asked for at ``step`` (1-based): linear warm-up from 0, then ``settings.ratio``."""
    return settings.ratio * min(1.0, step / settings.warmup_steps) if settings.warmup_steps else settings.ratio


def _mask_lr_factor(settings: MaskSettings, done: int) -> float:
    """Constant through the warm-up, then cosine decay to ``FINAL_LR_FACTOR``: the size settles on the target."""
    if done < settings.warmup_steps:
        return 1.0
    progress = (done - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return FINAL_LR_FACTOR + (1.0 - FINAL_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _weight_training(model: nn.Module, settings: MaskSettings) -> tuple[nn.Module, list[nn.Parameter]]:
    """(the module to run, the weights to train) for the chosen weight training."""
    if settings.train_weights == "none":
        return model, []
    if settings.train_weights == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model, list(model.parameters())
    from .recovery import RecoverySettings, lora_model

    torch.manual_seed(settings.seed)
    lora = RecoverySettings(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=0.0, seed=settings.seed)
    wrapped = lora_model(model, lora)
    return wrapped, [parameter for parameter in wrapped.parameters() if parameter.requires_grad]


@torch.no_grad()
def _structural_stats(model: nn.Module, batches, device) -> tuple[dict, float]:
    """Block influence and output activation of the dense model, and its mean loss, on a few batches."""
    collector = StructuralStatsCollector(model, adapter_for(model.config))
    try:
        loss = _mean_loss(model, batches, device)
    finally:
        collector.remove()
    return collector.scores(), loss


@torch.no_grad()
def _mean_loss(model: nn.Module, batches, device) -> float:
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
        count += len(batch)
    return total / count


def learn_masks(model: nn.Module, blocks: torch.Tensor, settings: MaskSettings) -> LearnedMasks:
    """Learn hard-concrete masks of ``settings.kinds`` on ``blocks`` [n, seq_len] until the expected size is
    at ``settings.ratio`` (within ``SIZE_TOLERANCE`` of the target size, else a one-line error)."""
    settings.validate()
    adapter, geometry = adapter_for(model.config), geometry_of(model)
    check_blocks(model, blocks, min_tokens=MIN_BLOCK_TOKENS, purpose="learning masks")
    widest = max(geometry.intermediate_sizes)
    if "mlp_channel" in settings.kinds and settings.channel_multiple >= widest:
        raise GqaPruneError(
            f"channel_multiple {settings.channel_multiple} is not below any layer's MLP width (at most {widest}): "
            "no MLP channel could be masked; lower --channel-multiple"
        )
    reachable = max_ratio(geometry, settings.kinds, settings.channel_multiple)
    if settings.ratio > reachable:
        raise GqaPruneError(
            f"ratio {settings.ratio} cannot be reached by masks of {', '.join(settings.kinds)}: at most "
            f"{reachable:.3f} of attention+MLP parameters can go while some layer keeps attention and an MLP "
            f"(MLP widths in multiples of {settings.channel_multiple}); add kinds or lower --ratio"
        )
    device = next(model.parameters()).device
    distribution = settings.distribution
    total = geometry.unit_params()
    stats_batches = list(blocks[: settings.stats_blocks].split(settings.batch_size))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(blocks), generator=generator)

    with frozen(model):
        structural, dense_loss = _structural_stats(model, stats_batches, device)
        parameters = MaskParameters(geometry, settings.kinds, settings.init_log_alpha).to(device)
        runner, weights = _weight_training(model, settings)
        mask_optimizer = torch.optim.Adam(parameters.parameters(), lr=settings.mask_lr)
        mask_schedule = torch.optim.lr_scheduler.LambdaLR(mask_optimizer, lambda done: _mask_lr_factor(settings, done))
        weight_optimizer = torch.optim.AdamW(weights, lr=settings.weight_lr, weight_decay=0.0) if weights else None
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lambda1, lambda2 = 0.0, settings.lambda2_init
        history: list[TrainingStep] = []
        tokens, start = 0, time.perf_counter()
        runner.train()
        progress = tqdm(range(1, settings.steps + 1), desc=f"learn masks (l0, ratio {settings.ratio})", unit="step")
        for step in progress:
            picks = [order[((step - 1) * settings.batch_size + i) % len(order)] for i in range(settings.batch_size)]
            batch = blocks[torch.stack(picks)].to(device)
            target = _target(settings, step)
            with unit_masks(model, adapter, geometry, parameters.sample(distribution, generator)):
                loss = runner(input_ids=batch, labels=batch, use_cache=False).loss
            gap = parameters.expected_remaining(distribution) / total - (1.0 - target)
            lagrangian = lambda1 * gap + lambda2 * gap * gap  # a tensor: gap depends on the log-alphas
            objective = loss + lagrangian
            if not torch.isfinite(objective):
                if settings.train_weights == "lora":
                    runner.unload()  # the model's own modules back, so that ``frozen`` can restore them
                raise GqaPruneError(
                    f"the loss became {objective.item()} at step {step}; nothing written "
                    f"(lower --mask-lr {settings.mask_lr} or --weight-lr {settings.weight_lr}, or use float32)"
                )
            objective.backward()
            mask_optimizer.step()
            mask_optimizer.zero_grad(set_to_none=True)
            mask_schedule.step()
            if weight_optimizer is not None:
                weight_optimizer.step()
                weight_optimizer.zero_grad(set_to_none=True)
            gap_value = float(gap.detach())
            lambda1 += settings.lambda_lr * gap_value  # ascent: d(objective)/d(lambda1) = gap
            lambda2 += settings.lambda_lr * gap_value * gap_value
            tokens += batch.numel()
            history.append(
                TrainingStep(step, loss.item(), float(lagrangian.detach()), target, target - gap_value,
                             lambda1, lambda2, tokens, time.perf_counter() - start)
            )  # fmt: skip
            progress.set_postfix(
                loss=f"{loss.item():.3f}", size=f"{1.0 - history[-1].expected_ratio:.3f}",
                target=f"{1.0 - target:.3f}", lam=f"{lambda1:.2f}",
            )  # fmt: skip
        runner.eval()
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        trained = _finish_weights(runner, settings)
        masks = deterministic_masks(parameters, distribution, settings.channel_multiple, settings.ratio)
        with unit_masks(trained if trained is not None else model, adapter, geometry, as_unit_masks(masks)):
            masked_loss = _mean_loss(trained if trained is not None else model, stats_batches, device)

    expected = history[-1].expected_ratio
    achieved = removed_ratio(geometry, masks)
    _check_size(settings, expected, achieved)
    scores = _scores(geometry, parameters, masks, structural, dense_loss, model)
    scores.info.update(
        l0={
            **{name: value for name, value in asdict(settings).items() if name != "kinds"},
            "kinds": list(settings.kinds),
            "expected_ratio": expected,
            "achieved_ratio": achieved,
            "masked_loss": masked_loss,
            "final_loss": history[-1].loss,
            "lambda1": lambda1,
            "lambda2": lambda2,
            "tokens": tokens,
            "size_tolerance": SIZE_TOLERANCE,
            "trained_weights": settings.train_weights != "none",
        },
        blocks=int(blocks.shape[0]),
        block_len=int(blocks.shape[1]),
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    logger.info(
        "learned masks: expected ratio %.4f, deterministic %.4f (target %.4f); loss %.4f dense -> %.4f masked",
        expected, achieved, settings.ratio, dense_loss, masked_loss,
    )  # fmt: skip
    return LearnedMasks(scores, history, trained, settings)


def _finish_weights(runner: nn.Module, settings: MaskSettings) -> nn.Module | None:
    """The model with trained weights (LoRA merged into them), or None when the weights were frozen."""
    if settings.train_weights == "none":
        return None
    if settings.train_weights == "lora":
        return runner.merge_and_unload()
    return runner


def _check_size(settings: MaskSettings, expected: float, achieved: float) -> None:
    """The expected and the deterministic size must both be within SIZE_TOLERANCE of the target size."""
    target_size = 1.0 - settings.ratio
    for what, ratio in (("expected", expected), ("deterministic", achieved)):
        if abs((1.0 - ratio) - target_size) > SIZE_TOLERANCE * target_size:
            raise GqaPruneError(
                f"after {settings.steps} steps the {what} masks remove {ratio:.4f} of attention+MLP parameters, "
                f"not within {SIZE_TOLERANCE:.0%} of the target size ({settings.ratio}); nothing written: "
                f"raise --steps or --lambda-lr"
            )


def _scores(
    geometry: Geometry, parameters: MaskParameters, masks, structural: dict, dense_loss: float, model: nn.Module
) -> Scores:
    """Importance-format scores: log-alphas as keep-scores (kinds without masks score by their mask: 1)."""
    learned = {
        name: [
            (
                parameters.get(name, layer).detach().float().cpu().clone()
                if parameters.get(name, layer) is not None
                else torch.full((KINDS[name].count(geometry, layer),), float("nan"))
            )
            for layer in range(geometry.num_layers)
        ]
        for name in KINDS
    }
    units = {
        kind.name: [
            values if not torch.isnan(values).any() else torch.zeros(len(values)) for values in learned[kind.name]
        ]
        for kind in WIDTH_KINDS
    }
    l0 = {
        name: [float(values[0]) if len(values) and not torch.isnan(values).any() else 0.0 for values in learned[name]]
        for name in ("layer", "attn_sublayer", "mlp_sublayer")
    }
    return Scores(
        criterion=CRITERION,
        geometry=geometry,
        units=units,
        structural={**structural, CRITERION: l0},
        calibration_loss=dense_loss,
        info={"parameters": sum(p.numel() for p in model.parameters())},
        masks=masks,
    )


# ----------------------------------------------------------------------------------------------- output
def write_training(history: list[TrainingStep], folder: Path, title: str) -> None:
    """``training.csv`` (one row per step) and ``training.png`` (loss and expected size against steps)."""
    columns = [name for name in TrainingStep.__dataclass_fields__]
    lines = [",".join(columns)] + [",".join(f"{getattr(step, name)}" for name in columns) for step in history]
    (folder / "training.csv").write_text("\n".join(lines) + "\n")
    plot_training(history, folder / "training.png", title)


def plot_training(history: list[TrainingStep], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step.step for step in history]
    figure, (loss_axis, size_axis) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
    loss_axis.plot(steps, [step.loss for step in history], color="tab:blue", linewidth=0.9, label="LM loss (masked)")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(fontsize="small")
    loss_axis.set_title(title, fontsize="medium")
    size_axis.plot(steps, [1 - step.expected_ratio for step in history], color="tab:green", label="expected size")
    size_axis.plot(steps, [1 - step.target_ratio for step in history], color="black", linestyle="--", label="target")
    size_axis.set_ylabel("attention+MLP kept (fraction)")
    size_axis.set_xlabel("step")
    lambda_axis = size_axis.twinx()
    lambda_axis.plot(steps, [step.lambda1 for step in history], color="tab:red", linewidth=0.8, label="lambda1")
    lambda_axis.set_ylabel("lambda1", color="tab:red")
    size_axis.legend(fontsize="small", loc="lower left")
    figure.tight_layout()
    figure.savefig(out_png, format="png", dpi=110)
    plt.close(figure)


def save_learned(
    result: LearnedMasks, out_dir: str | os.PathLike, tokenizer=None, provenance: dict | None = None
) -> Path:
    """Write the importance folder atomically: scores, training.csv/png, and trained weights under ``model/``."""
    import json

    from .atomic import atomic_dir
    from .scores import write_files

    result.scores.check_finite("learn-masks")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "learn-masks") as temporary:
        write_files(result.scores, temporary)
        ratio = result.settings.ratio if result.settings else result.scores.info["l0"]["ratio"]
        write_training(result.history, temporary, f"hard-concrete masks to ratio {ratio}")
        if result.trained_model is not None:
            from .sources import PROVENANCE_FILE

            folder = temporary / TRAINED_WEIGHTS_DIR
            result.trained_model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            record = {**(provenance or {}), "kind": "learn-masks trained weights", "masks": CRITERION}
            (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


@contextlib.contextmanager
def deterministic(model: nn.Module, scores: Scores):
    """The model with a scores' deterministic masks applied by hooks (the reference a pruned model matches)."""
    with unit_masks(model, adapter_for(model.config), scores.geometry, as_unit_masks(scores.masks)):
        yield model
