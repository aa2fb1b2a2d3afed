"""Pure reductions from per-weight salience to per-unit scores (a GQA group or an MLP channel)."""

from __future__ import annotations

import torch

from .arch import ProjectionRole


def weight_to_units(salience: torch.Tensor, role: ProjectionRole, indices_per_unit: int) -> torch.Tensor:
    """Sum a weight-shaped salience [out, in] over everything but the pruned axis, then over each unit's indices."""
    per_index = salience.sum(dim=1) if role.axis == "out" else salience.sum(dim=0)
    return per_index.view(-1, indices_per_unit).sum(dim=1)


def bias_to_units(salience: torch.Tensor, indices_per_unit: int) -> torch.Tensor:
    """Sum a bias-shaped salience [out] over each unit's rows (only out-axis projections have per-unit biases)."""
    return salience.view(-1, indices_per_unit).sum(dim=1)


def taylor_salience(parameter: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance |w * dL/dw| of every weight, in float32."""
    return (parameter.detach().float() * gradient.float()).abs()


def activation_salience(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda-style |w| * ||x|| with ||x|| the L2 norm of each input feature over the calibration tokens."""
    return weight.detach().float().abs() * input_norm.float().unsqueeze(0)
