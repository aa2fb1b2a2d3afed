"""``ExpertPlan``: which routed experts every MoE layer keeps, built from expert scores.

The allocation is uniform: every MoE layer loses ``round(expert_ratio x experts)`` experts, the lowest-scored
under the chosen criterion, so the pruned model keeps one expert count in its config and stock
``from_pretrained`` (and vLLM) load it with no custom code -- as every released pruned MoE does. A layer
must keep at least ``num_experts_per_tok`` experts (the router picks that many per token).

A plan is a value: it round-trips through JSON exactly and is validated on construction (kept indices
integers, sorted, unique, in range, at least top-k of them in every MoE layer, none in a dense layer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import MARKER, write_text
from .criteria.experts import DEFAULT_EXPERT_CRITERION, EXPERT_CRITERIA
from .errors import GqaPruneError
from .expert_scores import ExpertScores
from .moe import ExpertGeometry
from .plan import PLAN_KIND, PruningPlan, top_units

EXPERT_PLAN_FORMAT = "gqa-prune-expert-plan"
EXPERT_PLAN_VERSION = 1


@dataclass(frozen=True)
class ExpertPlan:
    geometry: ExpertGeometry  # the model the plan applies to
    expert_ratio: float
    criterion: str
    kept: tuple[tuple[int, ...], ...]  # per decoder layer: kept experts (empty where the MLP is dense)
    params_before: int  # all parameters of that model (embeddings included, tied ones once)
    seed: int = 0  # of the random criterion

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        geometry = self.geometry
        if len(self.kept) != geometry.num_layers:
            raise GqaPruneError(f"plan has {len(self.kept)} layers but the model has {geometry.num_layers}")
        for layer, (kept, experts) in enumerate(zip(self.kept, geometry.experts)):
            where = f"layer {layer}: kept experts"
            if not all(isinstance(index, int) and not isinstance(index, bool) for index in kept):
                raise GqaPruneError(f"{where} must be integer indices, got {list(kept)!r}")
            if not experts:
                if kept:
                    raise GqaPruneError(f"{where} must be empty: layer {layer} has a dense MLP")
                continue
            if list(kept) != sorted(set(kept)) or (kept and (kept[0] < 0 or kept[-1] >= experts)):
                raise GqaPruneError(f"{where} must be sorted, unique indices in 0..{experts - 1}")
            if len(kept) < geometry.top_k:
                raise GqaPruneError(
                    f"{where}: {len(kept)} of {experts}, fewer than the {geometry.top_k} experts every token is "
                    "routed to (num_experts_per_tok)"
                )

    def pruned_geometry(self) -> ExpertGeometry:
        return ExpertGeometry(
            self.geometry.family, self.geometry.top_k, tuple(len(kept) for kept in self.kept),
            self.geometry.params_per_expert,
        )  # fmt: skip

    @property
    def experts_removed(self) -> int:
        return sum(self.geometry.experts) - sum(len(kept) for kept in self.kept)

    @property
    def params_after(self) -> int:
        return self.params_before - self.experts_removed * self.geometry.params_per_expert

    @property
    def is_uniform(self) -> bool:
        return len({len(kept) for kept in self.kept if kept}) == 1

    def summary(self) -> dict:
        removed = self.experts_removed
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "experts_before": sum(self.geometry.experts),
            "experts_after": sum(self.geometry.experts) - removed,
            "achieved_expert_ratio": removed / max(1, sum(self.geometry.experts)),
        }

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": EXPERT_PLAN_FORMAT,
            "version": EXPERT_PLAN_VERSION,
            "geometry": self.geometry.to_dict(),
            "expert_ratio": self.expert_ratio,
            "criterion": self.criterion,
            "seed": self.seed,
            "params_before": self.params_before,
            "summary": self.summary(),  # derived; checked on load
            "kept_experts": [list(kept) for kept in self.kept],
            MARKER: PLAN_KIND,
        }

    def to_json(self) -> str:
        data = self.to_dict()
        kept = data.pop("kept_experts")
        head = json.dumps(data, indent=2, sort_keys=True)
        body = ",\n".join("    " + json.dumps(layer) for layer in kept)
        return head[:-2] + ',\n  "kept_experts": [\n' + body + "\n  ]\n}\n"

    @classmethod
    def from_dict(cls, data: dict) -> ExpertPlan:
        if data.get("format") != EXPERT_PLAN_FORMAT or data.get("version") != EXPERT_PLAN_VERSION:
            raise GqaPruneError(f"not a gqa-prune expert plan (format {data.get('format')!r})")
        plan = cls(
            geometry=ExpertGeometry.from_dict(data["geometry"]),
            expert_ratio=float(data["expert_ratio"]),
            criterion=str(data["criterion"]),
            kept=tuple(tuple(kept) for kept in data["kept_experts"]),
            params_before=int(data["params_before"]),
            seed=int(data.get("seed", 0)),
        )
        stored = data.get("summary")
        if isinstance(stored, dict) and any(stored.get(key) != value for key, value in plan.summary().items()):
            raise GqaPruneError(
                "plan summary does not match its kept experts (was the file edited?); rebuild it with `gqa-prune plan`"
            )
        return plan

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json(), PLAN_KIND)


def build_expert_plan(
    scores: ExpertScores, expert_ratio: float, criterion: str = DEFAULT_EXPERT_CRITERION, seed: int = 0
) -> ExpertPlan:
    """Remove ``round(expert_ratio x experts)`` experts of every MoE layer, the lowest-scored under ``criterion``."""
    if criterion not in EXPERT_CRITERIA:
        raise GqaPruneError(f"expert criterion {criterion!r} is not one of {', '.join(EXPERT_CRITERIA)}")
    if not 0.0 <= expert_ratio < 1.0:
        raise GqaPruneError(f"--expert-ratio must be in [0, 1), got {expert_ratio}")
    geometry = scores.geometry
    kept = []
    for layer, experts in enumerate(geometry.experts):
        if not experts:
            kept.append(())
            continue
        keep = experts - round(expert_ratio * experts)
        if keep < geometry.top_k:
            raise GqaPruneError(
                f"--expert-ratio {expert_ratio} keeps {keep} of layer {layer}'s {experts} experts, fewer than the "
                f"{geometry.top_k} every token is routed to (num_experts_per_tok); at most "
                f"{(experts - geometry.top_k) / experts:.4g} is possible"
            )
        layer_scores = EXPERT_CRITERIA[criterion].scores(scores.layer_stats(layer), layer, seed)
        kept.append(top_units(layer_scores, keep))
    return ExpertPlan(geometry, expert_ratio, criterion, tuple(kept), int(scores.info["parameters"]), seed)


def load_plan(path: str | os.PathLike) -> PruningPlan | ExpertPlan:
    """Read a plan file written by `gqa-prune plan`: a unit plan or an expert plan."""
    path = Path(path)
    if not path.is_file():
        raise GqaPruneError(f"plan file {str(path)!r} does not exist (write it with `gqa-prune plan`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != EXPERT_PLAN_FORMAT:
        return PruningPlan.load(path)
    try:
        return ExpertPlan.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, GqaPruneError):
            raise
        raise GqaPruneError(f"plan file {str(path)!r} is malformed: {error}") from error
