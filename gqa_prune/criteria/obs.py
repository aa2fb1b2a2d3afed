"""``obs``: the structured Optimal Brain Surgeon error of removing a unit, knowing the refit that follows.

For the output projection W that reads a unit's input columns Q (o_proj columns of a GQA group's heads,
the down_proj column of an MLP channel) and the Gram H of its inputs over the calibration tokens, removing
Q and optimally refitting the other columns raises the layer's output error by

    E_Q = tr( W_Q [(H^-1)_QQ]^-1 W_Q^T )        (ZipLM / SlimGPT; one column: sum_r W_rq^2 / (H^-1)_qq)

with H damped by 1 % of its mean diagonal. Computed layer by layer on the dense model's activations, so
only one layer's Grams exist at a time.

``greedy_obs_keep`` is the sequential form reconstruction uses to choose which units of a layer go (ZipLM,
SlimGPT): remove the unit of least error, apply the OBS update to W and H^-1, and score the rest again, so
units that duplicate each other are not all kept or all removed; its H carries the refit's ridge.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..passes import OUTPUT_ROLE, capture_layer_inputs, run_layer
from ..units import GQA_GROUP, MLP_CHANNEL
from .base import PassResults, UnitCriterion

DAMPING = 0.01
DIAGONAL_FLOOR = 1e-8  # of the mean diagonal: an input that is always 0 still gets a ridge term


MAX_GREEDY_STEPS = 1024  # greedy removal takes at most this many OBS updates per projection (else several units each)


def damped_inverse(gram: torch.Tensor) -> torch.Tensor:
    """(H + DAMPING * mean(diag H) * I)^-1 of a Gram matrix (float64)."""
    size = gram.shape[0]
    damped = gram + DAMPING * gram.diagonal().mean() * torch.eye(size, dtype=gram.dtype, device=gram.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(damped))


def _group_errors(weight: torch.Tensor, inverse: torch.Tensor, width: int, groups: torch.Tensor) -> torch.Tensor:
    """E_Q of the given groups of ``width`` consecutive columns, batched."""
    if width == 1:  # single columns (MLP channels): sum_r W_rq^2 / (H^-1)_qq
        return weight[:, groups].pow(2).sum(0) / inverse.diagonal()[groups]
    columns = groups.unsqueeze(1) * width + torch.arange(width, device=groups.device)  # [groups, width]
    blocks = inverse[columns.unsqueeze(2), columns.unsqueeze(1)]  # [groups, width, width]
    parts = weight[:, columns].transpose(0, 1)  # [groups, out, width]
    return torch.einsum("goi,gij,goj->g", parts, torch.linalg.inv(blocks), parts)


def obs_errors(weight: torch.Tensor, gram: torch.Tensor, width: int) -> torch.Tensor:
    """E_Q for consecutive groups of ``width`` input columns of ``weight`` [out, in] (float64)."""
    groups = torch.arange(gram.shape[0] // width, device=gram.device)
    return _group_errors(weight.detach().to(torch.float64), damped_inverse(gram), width, groups).float().cpu()


def greedy_obs_keep(
    weight: torch.Tensor,
    gram: torch.Tensor,
    width: int,
    remove: int,
    ridge: float,
) -> torch.Tensor:
    """The ``groups - remove`` groups of ``width`` columns of ``weight`` [out, in] to keep, ascending: remove
    the group whose removal raises the refit's error least, update W and H^-1 as OBS does, repeat.

    The error is the exact increase of the objective ``reconstruct.refit_columns`` minimises with ``ridge``
    (pull towards the original columns, relative to each input's Gram diagonal): OBS on H + ridge * diag(H),
    less the pull term the removed columns no longer pay. Past MAX_GREEDY_STEPS removals (8B MLPs), each step
    removes the several groups of least error at once.
    """
    groups = gram.shape[0] // width
    if not 0 <= remove < groups:
        raise ValueError(f"cannot remove {remove} of {groups} groups")
    gram = gram.to(torch.float64)
    weight = weight.detach().to(torch.float64)
    if not torch.isfinite(gram).all():  # (a non-finite weight is left to the refit, which refuses its result)
        raise torch.linalg.LinAlgError("the inputs' Gram matrix is not finite (NaN/Inf)")
    diagonal = gram.diagonal().clamp(min=DIAGONAL_FLOOR * max(float(gram.diagonal().mean()), 1e-30))
    damped = gram + torch.diag(ridge * diagonal)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    pull = (ridge * diagonal * weight.pow(2).sum(0)).view(groups, width).sum(1)
    weight = weight.clone()
    alive = torch.ones(groups, dtype=torch.bool, device=gram.device)
    per_step = -(-remove // MAX_GREEDY_STEPS)
    while remove > 0:
        candidates = torch.nonzero(alive).flatten()
        errors = _group_errors(weight, inverse, width, candidates) - pull[candidates]
        chosen = torch.sort(candidates[torch.argsort(errors, stable=True)[: min(per_step, remove)]]).values
        columns = (chosen.unsqueeze(1) * width + torch.arange(width, device=gram.device)).flatten()
        block_inverse = torch.linalg.inv(inverse[columns][:, columns])
        rows = inverse[columns]  # [removed columns, in]
        weight -= weight[:, columns] @ block_inverse @ rows
        inverse -= rows.T @ block_inverse @ rows
        weight[:, columns] = 0
        alive[chosen] = False
        remove -= len(chosen)
        if remove > 0 and not torch.isfinite(inverse).all():  # the downdates lost precision: recompute exactly
            inverse = alive_inverse(damped, alive, width)
    return torch.nonzero(alive).flatten().cpu()


def alive_inverse(damped: torch.Tensor, alive: torch.Tensor, width: int) -> torch.Tensor:
    """What the OBS downdates of ``damped``'s inverse converge to: the inverse of the rows and columns of the
    ``alive`` groups, zero for the removed ones (computed afresh, by Cholesky)."""
    columns = torch.nonzero(alive.repeat_interleave(width)).flatten()
    inverse = torch.zeros_like(damped)
    inverse[columns.unsqueeze(1), columns] = torch.cholesky_inverse(torch.linalg.cholesky(damped[columns][:, columns]))
    return inverse


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
