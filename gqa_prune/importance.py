"""Importance scores, no mutation: per unit (GQA group, MLP channel) and per layer.

Unit criteria: ``taylor`` |w * dL/dw| (gradients of every layer from ONE backward per calibration batch,
folded into unit scores by a post-accumulate hook and freed at once), ``magnitude`` (L1 of the unit's
weights), ``activation`` (Wanda-style |w| * ||x||) and ``random`` (seeded baseline).
Layer criteria: ``block_influence`` (1 - cos(input, output) of a decoder layer, ShortGPT) and
``activation`` (mean L2 norm of a layer's output) come from the same forward passes; ``removal`` (loss
increase when a layer is bypassed) costs one extra forward over the calibration blocks per layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import ALL_ROLES, FamilyAdapter, Geometry, ProjectionRole, adapter_for, geometry_of
from .atomic import atomic_dir
from .errors import GqaPruneError
from .reduce import activation_salience, bias_to_units, taylor_salience, weight_to_units

logger = logging.getLogger(__name__)

UNIT_CRITERIA = ("taylor", "magnitude", "activation", "random")
LAYER_CRITERIA = ("block_influence", "activation", "removal")
GROUPS_FILE = "groups.safetensors"
LAYERS_FILE = "layers.json"


@dataclass
class UnitScores:
    """One score per GQA group and per MLP channel, for every layer (float32, higher = keep)."""

    attn_groups: list[torch.Tensor]
    mlp_channels: list[torch.Tensor]

    @classmethod
    def zeros(cls, geometry: Geometry) -> UnitScores:
        return cls(
            [torch.zeros(groups) for groups in geometry.kv_groups],
            [torch.zeros(channels) for channels in geometry.intermediate_sizes],
        )

    def of(self, unit: str) -> list[torch.Tensor]:
        return self.attn_groups if unit == "attn" else self.mlp_channels

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for layer, (groups, channels) in enumerate(zip(self.attn_groups, self.mlp_channels)):
            tensors[f"layers.{layer}.attn_groups"] = groups.contiguous()
            tensors[f"layers.{layer}.mlp_channels"] = channels.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_layers: int) -> UnitScores:
        return cls(
            [tensors[f"layers.{layer}.attn_groups"] for layer in range(num_layers)],
            [tensors[f"layers.{layer}.mlp_channels"] for layer in range(num_layers)],
        )


@dataclass
class ImportanceResult:
    """Everything the importance stage produces: unit scores, layer scores and how they were made."""

    criterion: str
    geometry: Geometry
    units: UnitScores
    layer_scores: dict[str, list[float]]
    calibration_loss: float
    info: dict = field(default_factory=dict)  # calibration metadata, blocks, batch size, seed


def check_finite(result: ImportanceResult, where: str) -> None:
    """Refuse NaN/Inf anywhere in the scores: a plan built on them would be arbitrary."""
    for name, tensor in result.units.to_tensors().items():
        if not torch.isfinite(tensor).all():
            raise GqaPruneError(
                f"{where}: unit scores {name} contain NaN/Inf (criterion {result.criterion}); "
                "check weights and calibration data"
            )
    for name, values in result.layer_scores.items():
        if not all(math.isfinite(value) for value in values):
            raise GqaPruneError(f"{where}: layer scores {name!r} contain NaN/Inf; check weights and calibration data")
    if not math.isfinite(result.calibration_loss):
        raise GqaPruneError(f"{where}: calibration loss is {result.calibration_loss}; the model output is not finite")


# ----------------------------------------------------------------------------------------------- collectors
class _TaylorCollector:
    """Post-accumulate-grad hooks: fold |w * g| into unit scores as each gradient arrives, then free it."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, geometry: Geometry, units: UnitScores):
        self.handles = []
        for layer_index, layer in enumerate(adapter.decoder_layers(model)):
            for role in ALL_ROLES:
                projection = adapter.projection(layer, role)
                width = geometry.indices_per_unit(role)
                target = units.of(role.unit)[layer_index]
                self._watch(
                    projection.weight,
                    lambda p, role=role, width=width, target=target: target.add_(
                        weight_to_units(taylor_salience(p, p.grad), role, width).cpu()
                    ),
                )
                if role.axis == "out" and projection.bias is not None:
                    self._watch(
                        projection.bias,
                        lambda p, width=width, target=target: target.add_(
                            bias_to_units(taylor_salience(p, p.grad), width).cpu()
                        ),
                    )

    def _watch(self, parameter: nn.Parameter, fold) -> None:
        def hook(param: torch.Tensor) -> None:
            fold(param)
            param.grad = None  # free now: peak gradient memory stays at about one projection

        parameter.requires_grad_(True)
        self.handles.append(parameter.register_post_accumulate_grad_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _InputNormCollector:
    """Forward-pre hooks summing x^2 per input feature of every projection (for activation scores)."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.squares: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        for layer_index, layer in enumerate(adapter.decoder_layers(model)):
            for role in ALL_ROLES:
                key = (layer_index, role.module)
                self.handles.append(
                    adapter.projection(layer, role).register_forward_pre_hook(
                        lambda module, args, key=key: self._add(key, args[0])
                    )
                )

    def _add(self, key: tuple[int, str], inputs: torch.Tensor) -> None:
        squares = inputs.detach().float().pow(2).flatten(0, -2).sum(dim=0)
        self.squares[key] = squares if key not in self.squares else self.squares[key] + squares

    def norm(self, layer_index: int, role: ProjectionRole) -> torch.Tensor:
        return self.squares[(layer_index, role.module)].sqrt()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _LayerStatsCollector:
    """Hooks on decoder layers: 1 - cos(input, output) and output norm, summed over tokens."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        layers = adapter.decoder_layers(model)
        self.influence = [0.0] * len(layers)
        self.output_norm = [0.0] * len(layers)
        self.tokens = 0
        self._inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: self._remember(index, args, kwargs), with_kwargs=True
                )
            )
            self.handles.append(
                layer.register_forward_hook(lambda module, args, output, index=index: self._measure(index, output))
            )

    def _remember(self, index: int, args: tuple, kwargs: dict) -> None:
        self._inputs[index] = args[0] if args else kwargs["hidden_states"]

    def _measure(self, index: int, output) -> None:
        hidden_out = (output[0] if isinstance(output, tuple) else output).detach().float()
        hidden_in = self._inputs.pop(index).detach().float()
        cosine = nn.functional.cosine_similarity(hidden_in, hidden_out, dim=-1)
        self.influence[index] += (1.0 - cosine).sum().item()
        self.output_norm[index] += hidden_out.norm(dim=-1).sum().item()
        if index == 0:
            self.tokens += cosine.numel()

    def scores(self) -> dict[str, list[float]]:
        return {
            "block_influence": [value / self.tokens for value in self.influence],
            "activation": [value / self.tokens for value in self.output_norm],
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Bypass(nn.Module):
    """Stands in for a decoder layer: returns its input hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


# ----------------------------------------------------------------------------------------------- passes
def _batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(blocks.split(batch_size))


def _mean_loss(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, desc: str | None = None
) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
            batch = batch.to(device)
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
            count += len(batch)
    return total / count


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad everywhere (collectors turn it on where needed) and restore it afterwards."""
    previous = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    was_training = model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous[name])
            parameter.grad = None
        model.train(was_training)


def removal_scores(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, base_loss: float
) -> list[float]:
    """Loss increase on the calibration blocks when each decoder layer in turn is bypassed."""
    layers = adapter_for(model.config).decoder_layers(model)
    increases = []
    for index in tqdm(range(len(layers)), desc="removal", unit="layer"):
        original = layers[index]
        layers[index] = _Bypass()
        try:
            increases.append(_mean_loss(model, batches, device) - base_loss)
        finally:
            layers[index] = original
    return increases


def score(
    model: nn.Module,
    blocks: torch.Tensor,
    criterion: str,
    layer_criteria: Sequence[str] = ("block_influence", "activation"),
    batch_size: int = 4,
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> ImportanceResult:
    """Score every unit and layer of ``model`` on calibration ``blocks`` [n, seq_len]."""
    if criterion not in UNIT_CRITERIA:
        raise GqaPruneError(f"unit criterion {criterion!r} is not one of {', '.join(UNIT_CRITERIA)}")
    unknown = [name for name in layer_criteria if name not in LAYER_CRITERIA]
    if unknown:
        raise GqaPruneError(f"layer criterion {unknown[0]!r} is not one of {', '.join(LAYER_CRITERIA)}")
    if batch_size < 1:
        raise GqaPruneError(f"batch_size must be >= 1, got {batch_size}")
    vocab_size = model.get_input_embeddings().num_embeddings
    if blocks.numel() and int(blocks.max()) >= vocab_size:
        raise GqaPruneError(
            f"calibration token id {int(blocks.max())} >= vocab size {vocab_size}: "
            "blocks were made with another tokenizer"
        )

    adapter, geometry = adapter_for(model.config), geometry_of(model)
    device = next(model.parameters()).device
    batches = _batches(blocks, batch_size)
    units = UnitScores.zeros(geometry)
    with _frozen(model):
        layer_stats = _LayerStatsCollector(model, adapter)
        input_norms = _InputNormCollector(model, adapter) if criterion == "activation" else None
        try:
            if criterion == "taylor":
                loss = _taylor_passes(model, adapter, geometry, units, batches, device, gradient_checkpointing)
            else:
                loss = _mean_loss(model, batches, device, desc=f"{criterion} forward")
        finally:
            layer_stats.remove()
            if input_norms:
                input_norms.remove()
        layer_scores = {name: values for name, values in layer_stats.scores().items() if name in layer_criteria}
        if "removal" in layer_criteria:
            layer_scores["removal"] = removal_scores(model, batches, device, loss)

    if criterion == "magnitude":
        _fold_static(
            model,
            adapter,
            geometry,
            units,
            lambda role, projection, layer: projection.weight.detach().float().abs(),
            bias_salience=lambda bias: bias.detach().float().abs(),
        )
    elif criterion == "activation":
        _fold_static(
            model,
            adapter,
            geometry,
            units,
            lambda role, projection, layer: activation_salience(projection.weight, input_norms.norm(layer, role)),
        )
    elif criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        units = UnitScores(
            [torch.rand(len(s), generator=generator) for s in units.attn_groups],
            [torch.rand(len(s), generator=generator) for s in units.mlp_channels],
        )

    result = ImportanceResult(
        criterion=criterion,
        geometry=geometry,
        units=units,
        layer_scores=layer_scores,
        calibration_loss=loss,
        info={
            "blocks": int(blocks.shape[0]),
            "block_len": int(blocks.shape[1]),
            "batch_size": batch_size,
            "seed": seed,
            "forward_backward_passes": len(batches) if criterion == "taylor" else 0,
        },
    )
    check_finite(result, "importance")
    return result


def _taylor_passes(model, adapter, geometry, units, batches, device, gradient_checkpointing) -> float:
    """One forward+backward per batch; the collector folds every layer's gradients during that backward."""
    collector = _TaylorCollector(model, adapter, geometry, units)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # HF checkpoints only in training mode; the supported families have no dropout by default
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc="taylor forward+backward", unit="batch"):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            total += loss.item() * len(batch)
            count += len(batch)
    finally:
        collector.remove()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
    return total / count


def _fold_static(model, adapter, geometry, units, weight_salience, bias_salience=None) -> None:
    """Scores that need no gradients: fold each projection's weight-shaped salience into unit scores.

    ``bias_salience`` (optional) maps an out-axis projection's bias to a bias-shaped salience.
    """
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        for role in ALL_ROLES:
            projection = adapter.projection(layer, role)
            width = geometry.indices_per_unit(role)
            target = units.of(role.unit)[layer_index]
            target.add_(weight_to_units(weight_salience(role, projection, layer_index), role, width).cpu())
            if bias_salience is not None and role.axis == "out" and projection.bias is not None:
                target.add_(bias_to_units(bias_salience(projection.bias), width).cpu())


# ----------------------------------------------------------------------------------------------- storage
def save(result: ImportanceResult, out_dir: str | os.PathLike) -> Path:
    """Write ``groups.safetensors`` (unit scores) and ``layers.json`` (layer scores, provenance) atomically."""
    check_finite(result, "importance")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as temporary:
        # one metadata key: safetensors writes several in a random order, and artefacts must be byte-reproducible
        provenance = {"criterion": result.criterion, "geometry": result.geometry.to_dict()}
        metadata = {"gqa_prune": json.dumps(provenance, sort_keys=True)}
        save_file(result.units.to_tensors(), str(temporary / GROUPS_FILE), metadata=metadata)
        layers = {
            "criterion": result.criterion,
            "geometry": result.geometry.to_dict(),
            "layer_scores": result.layer_scores,
            "calibration_loss": result.calibration_loss,
            "info": result.info,
        }
        (temporary / LAYERS_FILE).write_text(json.dumps(layers, indent=2, sort_keys=True) + "\n")
    return out_dir


def load(in_dir: str | os.PathLike) -> ImportanceResult:
    """Read an importance folder back, refusing missing files and non-finite scores."""
    in_dir = Path(in_dir)
    groups_file, layers_file = in_dir / GROUPS_FILE, in_dir / LAYERS_FILE
    if not groups_file.is_file() or not layers_file.is_file():
        raise GqaPruneError(
            f"importance folder {str(in_dir)!r} lacks {GROUPS_FILE} or {LAYERS_FILE} "
            "(write it with `gqa-prune importance`)"
        )
    layers = json.loads(layers_file.read_text())
    geometry = Geometry.from_dict(layers["geometry"])
    with safe_open(str(groups_file), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    result = ImportanceResult(
        criterion=layers["criterion"],
        geometry=geometry,
        units=UnitScores.from_tensors(tensors, geometry.num_layers),
        layer_scores=layers["layer_scores"],
        calibration_loss=layers["calibration_loss"],
        info=layers.get("info", {}),
    )
    check_finite(result, str(in_dir))
    return result
