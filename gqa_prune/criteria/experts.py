"""Expert criteria: keep-scores of the routed experts of each MoE layer (higher = keep), all folded from the
same forward-only calibration pass (``expert_importance``), which records per expert:

- ``count``: tokens routed to it;
- ``gate_sum``: the sum of its gates over those tokens (each token's top-k gates renormalised to sum to 1);
- ``norm_sum``: the sum of the L2 norms of its outputs over those tokens;
- ``gate_norm_sum``: the sum of gate x output norm.

REAP (router-weighted expert activation pruning, arXiv 2510.13999) is ``gate_norm_sum / count``: how much an
expert adds to the tokens it serves. The weaker ones compared against it: routing frequency (``count``), gate
sum and expert activation norm (``norm_sum``, EAN). An expert never routed to scores 0 under every one.
The same pass records ``channel``: per expert and intermediate channel, gate x |activation| x the norm of the
channel's down_proj column, summed over routed tokens (the keep-score of expert channels), and ``group``:
per GQA group of every attention layer, the L2 norm of what the group writes to the residual stream through
o_proj, summed over tokens (the keep-score of a MoE model's GQA groups: their output norm, as EAN is the
experts'), and ``shared``: per channel of a shared MLP, |activation| x the norm of its output column, summed
over tokens (Wanda-style, as a dense model's activation criterion scores MLP channels).

With gradients (``importance --criterion taylor`` or ``fisher`` on a MoE model: one backward per batch) the
pass also records, per expert, the dense criteria where they apply:

- ``taylor``: |w * dL/dw| summed over the expert's own weights (its slices of the fused expert tensors,
  biases included; not its router row, so an expert never routed to scores 0), summed over batches;
- ``fisher``: the sum over calibration samples of the squared first-order loss change of removing the expert,
  read at its gates: on sample n, sum over the tokens routed to it of gate x dL_n/dgate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..choices import DEFAULT_EXPERT_CRITERION
from ..errors import GqaPruneError

EXPERT_STATS = ("count", "gate_sum", "norm_sum", "gate_norm_sum")
# per expert and intermediate channel [experts, width]: the sum over routed tokens of gate x |activation| x the
# norm of the channel's down_proj column -- what the channel adds to the output (expert-channel scores)
CHANNEL_STAT = "channel"
GROUP_STAT = "group"  # per GQA group [kv_groups]: summed L2 norm of its o_proj output over tokens
# per shared-MLP channel [shared width]: sum over tokens of |activation| x the norm of its output column (before
# Qwen2-MoE's sigmoid gate on the whole shared expert)
SHARED_STAT = "shared"
TAYLOR_STAT, FISHER_STAT = "taylor", "fisher"  # [experts] each; recorded only by a pass with gradients
GRADIENT_STATS = (TAYLOR_STAT, FISHER_STAT)


class ExpertCriterion(ABC):
    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def scores(self, stats: dict[str, torch.Tensor], layer: int, seed: int) -> torch.Tensor:
        """Keep-scores of one layer's experts from its statistics (each a [experts] tensor)."""


class Reap(ExpertCriterion):
    name = "reap"
    description = "mean over routed tokens of gate x output norm (REAP)"

    def scores(self, stats, layer, seed):
        return stats["gate_norm_sum"] / stats["count"].clamp(min=1)


class StatisticSum(ExpertCriterion):
    """An expert's keep-score is one of the recorded sums as it stands (frequency, gate sum, EAN)."""

    def __init__(self, name: str, statistic: str, description: str):
        self.name, self.statistic, self.description = name, statistic, description

    def scores(self, stats, layer, seed):
        return stats[self.statistic].clone()


class GradientStatistic(StatisticSum):
    """A recorded sum that only a pass with gradients records (``importance --criterion taylor|fisher``)."""

    def scores(self, stats, layer, seed):
        if self.statistic not in stats:
            raise GqaPruneError(
                f"expert criterion {self.name} needs the experts' gradients, which these scores do not hold: "
                f"run `gqa-prune importance --criterion {self.name}` (one backward per batch)"
            )
        return super().scores(stats, layer, seed)


class RandomExperts(ExpertCriterion):
    name = "random"
    description = "seeded random scores (the baseline)"

    def scores(self, stats, layer, seed):
        generator = torch.Generator().manual_seed(seed * 100_003 + layer)
        return torch.rand(len(stats["count"]), generator=generator, dtype=torch.float64)


__all__ = [
    "CHANNEL_STAT", "EXPERT_STATS", "GROUP_STAT", "SHARED_STAT", "EXPERT_CRITERIA", "DEFAULT_EXPERT_CRITERION",
    "ExpertCriterion", "FISHER_STAT", "GRADIENT_STATS", "TAYLOR_STAT",
]  # fmt: skip

EXPERT_CRITERIA: dict[str, ExpertCriterion] = {
    c.name: c
    for c in (
        Reap(),
        StatisticSum("frequency", "count", "tokens routed to the expert"),
        StatisticSum("gate", "gate_sum", "sum of the expert's renormalised gates"),
        StatisticSum("ean", "norm_sum", "sum of the expert's output norms over routed tokens (EAN)"),
        RandomExperts(),
        GradientStatistic("taylor", TAYLOR_STAT, "|w·dL/dw| over the expert's weights (needs gradients)"),
        GradientStatistic("fisher", FISHER_STAT, "empirical Fisher of the expert's gate mask (needs gradients)"),
    )
}
