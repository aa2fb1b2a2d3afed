"""Settings of the plan, the reconstruction and the recovery: one definition each, importable without torch.

The library's dataclasses are the single source of each default: the CLI reads its option defaults from
them (``default_of``) and a test holds the workflow's config schema to the same values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

from .allocation import check_rate_bounds
from .choices import DEFAULT_MODE, MODES, RECONSTRUCTION_SELECTIONS, RECONSTRUCTION_TARGETS, STRATEGIES
from .errors import GqaPruneError

LOSSES = ("lm", "kd")
IMPORTANCE_BATCH_SIZE = 1  # calibration blocks per importance forward/backward (one 2048-token block)
CURVE_TOKENS = 8192  # default text of the loss curves: hybrid plans on 4 or 8 blocks of 2048 are the same (README)


def default_of(settings: type, name: str):
    """The default of field ``name`` of the dataclass ``settings`` (what a CLI option falls back to)."""
    for item in fields(settings):
        if item.name == name:
            if item.default is MISSING:
                raise KeyError(f"{settings.__name__}.{name} has no default")
            return item.default
    raise KeyError(f"{settings.__name__} has no field {name!r}")


@dataclass(frozen=True)
class CalibrationSettings:
    """How much C4 text ``gqa-prune calib`` samples by default: 32 blocks of 2048 tokens. The unit scores need
    far less, but the refit is data-hungry: on SmolLM2 at 20 %, 4x the bench's 8 x 2048 tokens with ridge 0.3
    took the default from 30.18 to 28.14 PPL (README, bench/levers.py)."""

    n_samples: int = 32
    seq_len: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class PlanSettings:
    """How the plan was asked for.

    ``ratio``: fraction of attention+MLP parameters to remove. ``attn_ratio`` / ``mlp_ratio`` (width mode
    only) override each part; left None they equal ``ratio``.
    """

    attn_ratio: float | None = None
    mlp_ratio: float | None = None
    strategy: str = "inverse"
    alpha: float = 1.0
    min_rate: float = 0.0
    max_rate: float = 0.8
    protected_layers: tuple[int, ...] = ()
    channel_multiple: int = 128
    layer_criterion: str = "block_influence"
    criterion: str = "taylor"  # the unit criterion of the scores the plan was built from
    ratio: float | None = None
    mode: str | None = None  # None: "width" when a hand split (attn_ratio / mlp_ratio) is given, else DEFAULT_MODE
    weights: str | None = None  # masks learned with trained weights: that checkpoint (prune refuses any other)

    def __post_init__(self) -> None:
        if self.mode is None:
            hand_split = self.attn_ratio is not None or self.mlp_ratio is not None
            object.__setattr__(self, "mode", "width" if hand_split else DEFAULT_MODE)

    @property
    def width_ratios(self) -> tuple[float, float]:
        """(attention, MLP) fraction to remove in width mode."""
        attn = self.ratio if self.attn_ratio is None else self.attn_ratio
        mlp = self.ratio if self.mlp_ratio is None else self.mlp_ratio
        return attn, mlp

    def validate(self, num_layers: int) -> None:
        if self.mode not in MODES:
            raise GqaPruneError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.ratio is not None:
            check_rate_bounds(self.ratio, "ratio")
        if self.mode == "width":
            attn, mlp = self.width_ratios
            if attn is None or mlp is None:
                raise GqaPruneError("a width plan needs a ratio, or both an attention and an MLP ratio")
            check_rate_bounds(attn, "attention ratio")
            check_rate_bounds(mlp, "MLP ratio")
        else:
            if self.ratio is None:
                raise GqaPruneError(f"a {self.mode} plan needs a ratio")
            if self.attn_ratio is not None or self.mlp_ratio is not None:
                raise GqaPruneError(
                    f"--attn-ratio/--mlp-ratio set a hand split and apply to --mode width only, not {self.mode} "
                    "(where the scores decide the split)"
                )
        if self.strategy not in STRATEGIES:
            raise GqaPruneError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not (0.0 <= self.min_rate <= self.max_rate < 1.0):
            raise GqaPruneError(
                f"need 0 <= min_rate <= max_rate < 1, got min_rate={self.min_rate}, max_rate={self.max_rate}"
            )
        if not (self.alpha >= 0.0):
            raise GqaPruneError(f"alpha {self.alpha} must be >= 0 (0 = no contrast between layers)")
        if self.channel_multiple < 1:
            raise GqaPruneError(f"channel_multiple {self.channel_multiple} must be >= 1")
        outside = [layer for layer in self.protected_layers if not 0 <= layer < num_layers]
        if outside:
            raise GqaPruneError(
                f"protected layer {outside[0]} does not exist: the model has layers 0..{num_layers - 1}"
            )


@dataclass(frozen=True)
class ReconstructionSettings:
    """How the refit runs. ``ridge``: strength relative to each kept input's Gram diagonal. ``select``: "obs"
    re-chooses which units of each layer go by greedy structured OBS on the pruned model's activations (the
    plan's count per layer and kind stays; plans of learned masks always keep their units); "plan" keeps the
    plan's units."""

    ridge: float = 0.3
    target: str = "own"  # "own": the dense layer on the pruned inputs; "dense": the dense model's own outputs
    select: str = "obs"
    batch_size: int = 1

    def validate(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise GqaPruneError(f"reconstruction ridge {self.ridge!r} must be a finite number > 0")
        if self.target not in RECONSTRUCTION_TARGETS:
            raise GqaPruneError(
                f"reconstruction target {self.target!r} is not one of {', '.join(RECONSTRUCTION_TARGETS)}"
            )
        if self.select not in RECONSTRUCTION_SELECTIONS:
            raise GqaPruneError(
                f"reconstruction selection {self.select!r} is not one of {', '.join(RECONSTRUCTION_SELECTIONS)}"
            )
        if self.batch_size < 1:
            raise GqaPruneError(f"reconstruction batch size {self.batch_size} must be >= 1")


@dataclass(frozen=True)
class RecoverySettings:
    loss: str = "lm"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-4
    steps: int = 50
    batch_size: int = 2
    warmup_steps: int = 5
    temperature: float = 2.0  # kd only
    seed: int = 0
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise GqaPruneError(f"recovery loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise GqaPruneError(f"recovery {name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.alpha > 0 and self.temperature > 0 and 0 <= self.dropout < 1):
            raise GqaPruneError(
                f"need lr > 0, alpha > 0, temperature > 0 and 0 <= dropout < 1; got lr={self.lr}, alpha={self.alpha}, "
                f"temperature={self.temperature}, dropout={self.dropout}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise GqaPruneError(f"warmup_steps {self.warmup_steps} must be in [0, steps={self.steps})")
