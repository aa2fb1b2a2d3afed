"""Calibration passes and the hooks that feed the criteria: nothing here decides what to prune.

A pass runs the model over calibration batches (forward only, or forward+backward) with *collectors*
attached: hooks that fold what they see into per-unit sums as it streams by, so no activation or gradient
outlives its layer. ``unit_masks`` applies removals (or learned soft masks) by hooks as well, without
touching the weights: a unit's contribution to the residual stream is multiplied by its mask.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ATTENTION_ROLES, MLP_ROLES, FamilyAdapter, Geometry, Scope
from .reduce import bias_to_units, taylor_salience, weight_to_units
from .units import GQA_GROUP, KINDS, MLP_CHANNEL, WIDTH_KINDS, width_kind

logger = logging.getLogger(__name__)

OUTPUT_ROLE: dict[Scope, object] = {"attn": ATTENTION_ROLES[3], "mlp": MLP_ROLES[2]}  # o_proj, down_proj


def output_projection(layer: nn.Module, adapter: FamilyAdapter, scope: Scope) -> nn.Linear | None:
    """The projection that writes a sublayer's result into the residual stream (None if the sublayer is gone)."""
    return None if adapter.sublayer(layer, scope) is None else adapter.projection(layer, OUTPUT_ROLE[scope])


class Collector:
    """Hooks attached for the duration of passes; ``remove`` detaches them."""

    def __init__(self) -> None:
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ----------------------------------------------------------------------------------------------- collectors
class PerSampleCollector(Protocol):
    """A collector whose gradient hooks need the batch size (to turn a batch-mean gradient per sample)."""

    samples: int

    def start_batch(self, batch_size: int) -> None: ...


class TaylorCollector(Collector):
    """Post-accumulate-grad hooks: fold |w * g| into unit scores as each gradient arrives, then free it."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, geometry: Geometry):
        super().__init__()
        self.units = {
            kind.name: [torch.zeros(kind.count(geometry, i)) for i in range(geometry.num_layers)]
            for kind in WIDTH_KINDS
        }
        for layer_index, layer in enumerate(adapter.decoder_layers(model)):
            for role, projection in adapter.projections(layer):
                width = geometry.indices_per_unit(role)
                target = self.units[width_kind(role.unit).name][layer_index]
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


class InputNormCollector(Collector):
    """Forward-pre hooks summing x^2 per input feature of every projection (for activation scores)."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        super().__init__()
        self.squares: dict[tuple[int, str], torch.Tensor] = {}
        for layer_index, layer in enumerate(adapter.decoder_layers(model)):
            for role, projection in adapter.projections(layer):
                key = (layer_index, role.module)
                self.handles.append(
                    projection.register_forward_pre_hook(lambda m, args, key=key: self._add(key, args[0]))
                )

    def _add(self, key: tuple[int, str], inputs: torch.Tensor) -> None:
        squares = inputs.detach().float().pow(2).flatten(0, -2).sum(dim=0)
        self.squares[key] = squares if key not in self.squares else self.squares[key] + squares

    def norm(self, layer_index: int, role) -> torch.Tensor:
        return self.squares[(layer_index, role.module)].sqrt()


class StructuralStatsCollector(Collector):
    """Residual stream around each sublayer: block influence (1 - cos) and output norms, summed over tokens.

    Hidden states are read before the layer, between its sublayers (the input of the MLP's norm) and after
    it; a sublayer a pruned model no longer has changes nothing and scores 0.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        super().__init__()
        layers = adapter.decoder_layers(model)
        zeros = lambda: [0.0] * len(layers)  # noqa: E731
        self.influence = {"layer": zeros(), "attn_sublayer": zeros(), "mlp_sublayer": zeros()}
        self.output_norm = {"layer": zeros(), "attn_sublayer": zeros(), "mlp_sublayer": zeros()}
        self.tokens = 0
        self._inputs: dict[int, torch.Tensor] = {}
        self._middles: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(layers):
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, index=index: self._inputs.__setitem__(
                        index, (args[0] if args else kwargs["hidden_states"]).detach().float()
                    ),
                    with_kwargs=True,
                )
            )
            norm = getattr(layer, adapter.norm_attr("mlp"))
            if norm is not None:
                self.handles.append(
                    norm.register_forward_pre_hook(
                        lambda m, args, index=index: self._middles.__setitem__(index, args[0].detach().float())
                    )
                )
            self.handles.append(
                layer.register_forward_hook(lambda m, args, output, index=index: self._measure(index, output))
            )

    def _add(self, kind: str, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cosine = nn.functional.cosine_similarity(before, after, dim=-1)
        self.influence[kind][index] += (1.0 - cosine).sum().item()
        self.output_norm[kind][index] += (
            (after - before).norm(dim=-1).sum().item() if kind != "layer" else after.norm(dim=-1).sum().item()
        )

    def _measure(self, index: int, output) -> None:
        hidden_out = (output[0] if isinstance(output, tuple) else output).detach().float()
        hidden_in = self._inputs.pop(index)
        hidden_mid = self._middles.pop(index, hidden_out)  # no MLP: the layer ends after attention
        self._add("layer", index, hidden_in, hidden_out)
        self._add("attn_sublayer", index, hidden_in, hidden_mid)
        self._add("mlp_sublayer", index, hidden_mid, hidden_out)
        if index == 0:
            self.tokens += hidden_in.shape[0] * hidden_in.shape[1]

    def scores(self) -> dict[str, dict[str, list[float]]]:
        """Per structural kind, mean over tokens (criterion -> kind -> per layer)."""
        per_token = lambda table: {kind: [v / self.tokens for v in values] for kind, values in table.items()}  # noqa: E731
        return {"block_influence": per_token(self.influence), "activation": per_token(self.output_norm)}


class MaskGradientCollector(Collector):
    """Per calibration sample, the first-order loss change of removing each unit of every kind.

    Removing a unit multiplies its contribution to the residual stream by a mask going from 1 to 0, so its
    first-order loss change on sample n is -g_n with g_n = sum over tokens of (contribution * dloss_n/dcontribution):
    for a GQA group its heads' columns of the o_proj input, for an MLP channel its down_proj input, for a
    sublayer the o_proj / down_proj output, for a layer both. Tensor hooks read these products during the
    backward pass; the sum of g^2 per unit is kept (the empirical Fisher of the unit's mask).
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, geometry: Geometry):
        super().__init__()
        self.geometry = geometry
        shape = {kind.name: [kind.count(geometry, i) for i in range(geometry.num_layers)] for kind in KINDS.values()}
        self.sum_squares = {
            kind: [torch.zeros(n, dtype=torch.float64) for n in counts] for kind, counts in shape.items()
        }
        self.samples = 0
        self._batch_size = 0
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        for index, layer in enumerate(adapter.decoder_layers(model)):
            for scope in ("attn", "mlp"):
                projection = output_projection(layer, adapter, scope)
                if projection is None:
                    continue
                per_unit = geometry.indices_per_unit(OUTPUT_ROLE[scope])
                self.handles.append(projection.register_forward_pre_hook(
                    lambda m, args, index=index, scope=scope, width=per_unit: self._watch_input(
                        index, scope, args[0], width
                    )
                ))  # fmt: skip
                self.handles.append(projection.register_forward_hook(
                    lambda m, args, output, index=index, scope=scope: self._watch_output(index, scope, output)
                ))  # fmt: skip

    def start_batch(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def _watch_input(self, index: int, scope: Scope, inputs: torch.Tensor, per_unit: int) -> None:
        if inputs.requires_grad:
            kind = GQA_GROUP.name if scope == "attn" else MLP_CHANNEL.name
            values = inputs.detach()  # the hook must not hold ``inputs`` itself: that cycle outlives the graph

            def hook(grad: torch.Tensor) -> None:
                products = (values * grad).float()
                per_sample = products.view(*products.shape[:2], -1, per_unit).sum(dim=(1, 3))
                self._fold(kind, index, per_sample)

            inputs.register_hook(hook)

    def _watch_output(self, index: int, scope: Scope, output: torch.Tensor) -> None:
        if output.requires_grad:
            kind = "attn_sublayer" if scope == "attn" else "mlp_sublayer"
            values = output.detach()  # as in _watch_input: no reference from the hook back to ``output``

            def hook(grad: torch.Tensor) -> None:
                per_sample = (values * grad).float().sum(dim=(1, 2)).unsqueeze(1)
                self._fold(kind, index, per_sample)
                layer_parts = self._pending.setdefault(index, {})
                layer_parts[kind] = per_sample
                if len(layer_parts) == len([s for s in ("attn", "mlp") if self.geometry.sublayer_params(index, s)]):
                    self._fold("layer", index, sum(self._pending.pop(index).values()))

            output.register_hook(hook)

    def _fold(self, kind: str, index: int, per_sample: torch.Tensor) -> None:
        # the batch loss is the mean of the samples' losses: a sample's own derivative is batch_size times its share
        gradients = -per_sample.double().cpu() * self._batch_size
        self.sum_squares[kind][index] += gradients.pow(2).sum(dim=0)

    def fisher(self) -> dict[str, list[torch.Tensor]]:
        """Per unit, the sum over samples of the squared first-order loss change of removing it."""
        return {kind: [q.float() for q in values] for kind, values in self.sum_squares.items()}


# ----------------------------------------------------------------------------------------------- masks
class _ZeroOutput(nn.Module):
    pass


@contextlib.contextmanager
def unit_masks(
    model: nn.Module, adapter: FamilyAdapter, geometry: Geometry, masks: Mapping[int, Mapping[str, torch.Tensor]]
) -> Iterator[None]:
    """Multiply each unit's contribution to the residual stream by its mask, for the duration of the block.

    ``masks``: layer -> kind -> tensor with one value per unit of that kind (0 removes it, 1 keeps it; any
    value in between scales it, which learned masks use). Weights are never touched.
    """
    handles = []
    layers = adapter.decoder_layers(model)
    try:
        for index, per_kind in masks.items():
            layer = layers[index]
            for scope in ("attn", "mlp"):
                projection = output_projection(layer, adapter, scope)
                if projection is None:
                    continue
                width = width_kind(scope).name
                sublayer_factor = None
                for name in ("layer", "attn_sublayer" if scope == "attn" else "mlp_sublayer"):
                    if name in per_kind:
                        factor = per_kind[name].reshape(())
                        sublayer_factor = factor if sublayer_factor is None else sublayer_factor * factor
                if width in per_kind:
                    columns = per_kind[width].repeat_interleave(geometry.indices_per_unit(OUTPUT_ROLE[scope]))
                    handles.append(projection.register_forward_pre_hook(
                        lambda m, args, columns=columns: (args[0] * columns.to(args[0].device, args[0].dtype),)
                    ))  # fmt: skip
                if sublayer_factor is not None:
                    handles.append(projection.register_forward_hook(
                        lambda m, args, output, factor=sublayer_factor: output * factor.to(output.device, output.dtype)
                    ))  # fmt: skip
        yield
    finally:
        for handle in handles:
            handle.remove()


def removal_masks(
    geometry: Geometry, removed: Mapping[int, Mapping[str, Sequence[int]]]
) -> dict[int, dict[str, torch.Tensor]]:
    """0/1 masks that remove the listed units: layer -> kind -> unit indices to remove."""
    masks: dict[int, dict[str, torch.Tensor]] = {}
    for layer, per_kind in removed.items():
        for kind_name, units in per_kind.items():
            if not len(units):
                continue
            mask = torch.ones(max(KINDS[kind_name].count(geometry, layer), 1))
            mask[torch.as_tensor(list(units), dtype=torch.long)] = 0.0
            masks.setdefault(layer, {})[kind_name] = mask
    return masks


# ----------------------------------------------------------------------------------------------- passes
@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
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


def mean_loss(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, desc: str | None = None
) -> float:
    """Mean next-token loss over the batches (each batch weighted by its number of blocks)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
            batch = batch.to(device)
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
            count += len(batch)
    return total / count


def forward_backward(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    gradient_checkpointing: bool = False,
    mask_gradients: PerSampleCollector | None = None,
    desc: str = "forward+backward",
) -> float:
    """One forward+backward per batch; attached collectors fold what they need during the backward."""
    embeddings = model.get_input_embeddings()
    # activation gradients reach every layer even where no weight asks for its gradient
    handle = embeddings.register_forward_hook(lambda m, args, output: output.requires_grad_(True))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # HF checkpoints only in training mode; the supported families have no dropout by default
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc=desc, unit="batch"):
            batch = batch.to(device)
            if mask_gradients is not None:
                mask_gradients.start_batch(len(batch))
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            total += loss.item() * len(batch)
            count += len(batch)
            if mask_gradients is not None:
                mask_gradients.samples += len(batch)
    finally:
        handle.remove()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
    return total / count


# ----------------------------------------------------------------------------------------------- layer by layer
@dataclass
class LayerInputs:
    """What layer-by-layer passes carry from one decoder layer to the next."""

    hidden: list[torch.Tensor]  # per batch: hidden states entering the current layer
    kwargs: list[dict]  # per batch: the keyword arguments decoder layers get (masks, rotary embeddings)


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor], device
) -> LayerInputs:
    """One forward per batch that stops at the first layer: its input hidden states and keyword arguments."""

    class _Stop(Exception):
        pass

    captured = LayerInputs([], [])

    def grab(module, args, kwargs):
        captured.hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        rest.update(use_cache=False, past_key_values=None)
        captured.kwargs.append(rest)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    logger.debug("captured the first layer's inputs of %d batches", len(captured.hidden))
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output
