"""``obs``: the structured Optimal Brain Surgeon error of removing a unit, knowing the refit that follows.

For the output projection W that reads a unit's input columns Q (o_proj columns of a GQA group's heads,
the down_proj column of an MLP channel) and the Gram H of its inputs over the calibration tokens, removing
Q and optimally refitting the other columns raises the layer's output error by

    E_Q = tr( W_Q [(H^-1)_QQ]^-1 W_Q^T )        (ZipLM / SlimGPT; one column: sum_r W_rq^2 / (H^-1)_qq)

with H damped by 1 % of its mean diagonal. Computed layer by layer on the dense model's activations, so
only one layer's Grams exist at a time.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..passes import OUTPUT_ROLE, capture_layer_inputs, run_layer
from ..units import GQA_GROUP, MLP_CHANNEL
from .base import PassResults, UnitCriterion

DAMPING = 0.01


def obs_errors(weight: torch.Tensor, gram: torch.Tensor, width: int) -> torch.Tensor:
    """E_Q for consecutive groups of ``width`` input columns of ``weight`` [out, in] (float64)."""
    size = gram.shape[0]
    damped = gram + DAMPING * gram.diagonal().mean() * torch.eye(size, dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    weight = weight.detach().to(torch.float64)
    errors = []
    for start in range(0, size, width):
        columns = slice(start, start + width)
        block = torch.linalg.inv(inverse[columns, columns])
        part = weight[:, columns]
        errors.append(torch.einsum("oi,ij,oj->", part, block, part))
    return torch.stack(errors).float().cpu()


class Obs(UnitCriterion):
    name = "obs"
    description = "structured OBS error of removing the unit with the refit that follows (from the layer's Gram)"

    def unit_scores(self, results: PassResults):
        model, adapter, geometry = results.model, results.adapter, results.geometry
        layers = adapter.decoder_layers(model)
        captured = capture_layer_inputs(model, layers, results.batches, results.device)
        units = {
            kind.name: [torch.zeros(kind.count(geometry, i)) for i in range(geometry.num_layers)]
            for kind in (GQA_GROUP, MLP_CHANNEL)
        }
        for index, layer in enumerate(tqdm(layers, desc="obs", unit="layer")):
            for kind in (GQA_GROUP, MLP_CHANNEL):
                scope = kind.scopes[0]
                if adapter.sublayer(layer, scope) is None:
                    continue
                projection = adapter.projection(layer, OUTPUT_ROLE[scope])
                grams = []
                handle = projection.register_forward_pre_hook(
                    lambda m, args: grams.append(args[0].detach().flatten(0, -2).to(torch.float64))
                )
                gram = None
                try:
                    with torch.no_grad():
                        for hidden, kwargs in zip(captured.hidden, captured.kwargs):
                            run_layer(layer, hidden, kwargs)
                            x = grams.pop()
                            gram = x.T @ x if gram is None else gram + x.T @ x
                finally:
                    handle.remove()
                units[kind.name][index] = obs_errors(
                    projection.weight, gram, geometry.indices_per_unit(OUTPUT_ROLE[scope])
                )
            with torch.no_grad():
                captured.hidden = [run_layer(layer, h, k) for h, k in zip(captured.hidden, captured.kwargs)]
        return units
