"""The hard-concrete distribution (Louizos et al., 2018): differentiable masks that are exactly 0 or 1 with
non-zero probability, and whose expected L0 norm has a closed form.

One mask per unit, parameterised by its ``log_alpha``; temperature ``beta`` and stretch limits
``lower < 0 < 1 < upper``::

    u ~ Uniform(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)      # binary concrete
    z = clamp(s * (upper - lower) + lower, 0, 1)               # stretched, then clipped: hard concrete

    P(z > 0)  = sigmoid(log_alpha - beta * log(-lower / upper))          (the expected L0 of one unit)
    P(z = 1)  = sigmoid(log_alpha - beta * log((1 - lower) / (upper - 1)))

The stretch matters: without it (the form the research notes' appendix writes, ``z = clamp(s, 0, 1)``) ``s``
never reaches 0 or 1, so no unit is ever exactly removed. The gradient reaches ``log_alpha`` by the
reparameterisation (``dz/ds = upper - lower`` where ``0 < z < 1``, else 0; ``ds/dlog_alpha = s(1-s)/beta``)
and autograd computes it; the closed-form expected L0 is differentiable in ``log_alpha`` directly.

GQA tying is structural, not a penalty: a GQA group (a KV head and all of its query heads) has one
``log_alpha`` and one sample, which ``expand_group_mask`` repeats over the group's query heads, so a query
head can never outlive (or be scaled apart from) its own KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GqaPruneError

EPSILON = 1e-6  # keeps u away from 0 and 1 so log u and log(1 - u) stay finite


@dataclass(frozen=True)
class HardConcrete:
    """The distribution's fixed shape: temperature and stretch limits (defaults of Louizos et al.)."""

    beta: float = 2.0 / 3.0
    lower: float = -0.1
    upper: float = 1.1

    def validate(self) -> None:
        if not (self.beta > 0 and self.lower < 0 and self.upper > 1):
            raise GqaPruneError(
                f"hard-concrete needs beta > 0 and lower < 0 < 1 < upper; got beta={self.beta}, "
                f"lower={self.lower}, upper={self.upper}"
            )

    @property
    def zero_shift(self) -> float:
        """beta * log(-lower / upper): P(z > 0) = sigmoid(log_alpha - zero_shift)."""
        return self.beta * math.log(-self.lower / self.upper)

    @property
    def one_shift(self) -> float:
        """beta * log((1 - lower) / (upper - 1)): P(z = 1) = sigmoid(log_alpha - one_shift)."""
        return self.beta * math.log((1.0 - self.lower) / (self.upper - 1.0))

    def sample(self, log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One differentiable sample z in [0, 1] per unit (training)."""
        uniform = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float32).to(log_alpha.device)
        uniform = uniform.clamp(EPSILON, 1.0 - EPSILON)
        return self.from_uniform(log_alpha, uniform)

    def from_uniform(self, log_alpha: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The sample for given uniform noise (split out so tests can check it against the formula)."""
        noise = torch.log(uniform) - torch.log1p(-uniform)
        stretched = torch.sigmoid((noise + log_alpha) / self.beta) * (self.upper - self.lower) + self.lower
        return stretched.clamp(0.0, 1.0)

    def prob_nonzero(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(z > 0) per unit: the closed-form expected L0 (differentiable in log_alpha)."""
        return torch.sigmoid(log_alpha - self.zero_shift)

    def prob_one(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(z = 1) per unit."""
        return torch.sigmoid(log_alpha - self.one_shift)

    def median(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The noise-free mask clamp(sigmoid(log_alpha / beta) * (upper - lower) + lower, 0, 1)."""
        return (torch.sigmoid(log_alpha / self.beta) * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0)

    def log_alpha_for(self, prob_nonzero: float) -> float:
        """The log_alpha whose P(z > 0) is ``prob_nonzero`` (for initialisation)."""
        if not 0.0 < prob_nonzero < 1.0:
            raise GqaPruneError(f"an initial keep probability must be in (0, 1), got {prob_nonzero}")
        return math.log(prob_nonzero / (1.0 - prob_nonzero)) + self.zero_shift


def expand_group_mask(group_mask: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """Per query head, the mask of its GQA group (query head h belongs to group h // heads_per_group)."""
    return group_mask.repeat_interleave(heads_per_group, dim=-1)


def kept_sizes(units: int, multiple: int) -> list[int]:
    """Sizes a layer may keep of ``units``: 0, multiples of ``multiple`` below ``units``, and ``units``."""
    return sorted({0, units, *range(multiple, units, multiple)})


def deterministic_count(expected_kept: float, units: int, multiple: int = 1) -> int:
    """How many units a layer keeps at the end: the allowed size nearest its expected L0 (ties keep more)."""
    return min(kept_sizes(units, multiple), key=lambda size: (abs(size - expected_kept), -size))


def top_k_mask(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask keeping the ``keep`` largest log_alpha (ties keep the lower index, as plans do)."""
    values = log_alpha.detach().float().cpu().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    mask = torch.zeros(len(values))
    mask[order[:keep]] = 1.0
    return mask
