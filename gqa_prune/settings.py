"""Settings of the plan, the reconstruction and the recovery: one definition each, importable without torch.

The library's dataclasses are the single source of each default: the CLI reads its option defaults from
them (``default_of``) and a test holds the workflow's config schema to the same values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

from .allocation import check_rate_bounds
from .choices import (
    DEFAULT_EXPERT_CRITERION,
    DEFAULT_MODE,
    EXPERT_ALLOCATIONS,
    EXPERT_CRITERIA,
    MODES,
    RECONSTRUCTION_SELECTIONS,
    RECONSTRUCTION_TARGETS,
    STRATEGIES,
)
from .errors import SettingError

LOSSES = ("lm", "kd")
ROUTER_MODES = ("frozen", "trainable")  # recovery of a mixture of experts: its routers kept, or fully trained
IMPORTANCE_BATCH_SIZE = 1  # calibration blocks per importance forward/backward (one 2048-token block)
# default text of the loss curves: hybrid plans on 4 or 8 blocks of 2048 are the same (docs/benchmarks/history.md)
CURVE_TOKENS = 8192


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
    took the default from 30.18 to 28.14 PPL (docs/concepts/reconstruction.md, bench/levers.py)."""

    n_samples: int = 32
    seq_len: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class ExpertPlanSettings:
    """How `gqa-prune plan --expert-ratio` prunes a mixture of experts (``gqa_prune.expert_plan``)."""

    expert_ratio: float
    criterion: str = DEFAULT_EXPERT_CRITERION
    allocation: str = EXPERT_ALLOCATIONS[0]
    channel_ratio: float = 0.0
    channel_multiple: int = 128
    seed: int = 0
    width_ratio: float = 0.0  # of GQA groups and shared-MLP channels (`plan --ratio` on a MoE's scores)
    whole_layers: bool = False  # per-layer allocation: layers and single blocks compete too (`plan --whole-layers`)

    def validate(self) -> None:
        """Refuse bad values in one line (a ``SettingError`` naming the field)."""
        for name, option in (
            ("expert_ratio", "--expert-ratio"),
            ("channel_ratio", "--expert-channel-ratio"),
            ("width_ratio", "--ratio"),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise SettingError(f"{option} must be in [0, 1), got {value}", field=name)
        if self.criterion not in EXPERT_CRITERIA:
            raise SettingError(
                f"expert criterion {self.criterion!r} is not one of {', '.join(EXPERT_CRITERIA)}", field="criterion"
            )
        if self.allocation not in EXPERT_ALLOCATIONS:
            raise SettingError(
                f"--experts {self.allocation!r} is not one of {', '.join(EXPERT_ALLOCATIONS)}", field="allocation"
            )
        if self.channel_multiple < 1:
            raise SettingError(f"channel_multiple must be >= 1, got {self.channel_multiple}", field="channel_multiple")
        if self.whole_layers and self.allocation != "per-layer":
            raise SettingError(
                f"--whole-layers prices layers against experts by measured loss curves: it needs --experts per-layer, "
                f"not {self.allocation}",
                field="whole_layers",
            )


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

    def validate(self, num_layers: int | None) -> None:
        """Refuse bad values in one line (a ``SettingError`` naming the field). ``num_layers`` None: the model is
        not known yet (the workflow before staging), so protected layers are not checked against it."""
        if self.mode not in MODES:
            raise SettingError(f"mode {self.mode!r} is not one of {', '.join(MODES)}", field="mode")
        if self.ratio is not None:
            check_rate_bounds(self.ratio, "ratio")
        if self.mode == "width":
            attn, mlp = self.width_ratios
            if attn is None or mlp is None:
                raise SettingError("a width plan needs a ratio, or both an attention and an MLP ratio", field="ratio")
            check_rate_bounds(attn, "attention ratio", field="ratio" if self.attn_ratio is None else "attn_ratio")
            check_rate_bounds(mlp, "MLP ratio", field="ratio" if self.mlp_ratio is None else "mlp_ratio")
        else:
            if self.ratio is None:
                raise SettingError(f"a {self.mode} plan needs a ratio", field="ratio")
            if self.attn_ratio is not None or self.mlp_ratio is not None:
                raise SettingError(
                    f"--attn-ratio/--mlp-ratio set a hand split and apply to --mode width only, not {self.mode} "
                    "(where the scores decide the split)",
                    field="attn_ratio" if self.attn_ratio is not None else "mlp_ratio",
                )
        if self.strategy not in STRATEGIES:
            raise SettingError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}", field="strategy")
        if not (0.0 <= self.min_rate <= self.max_rate < 1.0):
            raise SettingError(
                f"need 0 <= min_rate <= max_rate < 1, got min_rate={self.min_rate}, max_rate={self.max_rate}",
                field="max_rate" if not 0.0 <= self.max_rate < 1.0 else "min_rate",
            )
        if not (self.alpha >= 0.0):
            raise SettingError(f"alpha {self.alpha} must be >= 0 (0 = no contrast between layers)", field="alpha")
        if self.channel_multiple < 1:
            raise SettingError(f"channel_multiple {self.channel_multiple} must be >= 1", field="channel_multiple")
        last = math.inf if num_layers is None else num_layers - 1
        outside = [layer for layer in self.protected_layers if not 0 <= layer <= last]
        if outside:
            layers = "layers count from 0" if num_layers is None else f"the model has layers 0..{last}"
            raise SettingError(f"protected layer {outside[0]} does not exist: {layers}", field="protected_layers")


@dataclass(frozen=True)
class ReconstructionSettings:
    """How the refit runs. ``ridge``: strength relative to each kept input's Gram diagonal. ``select``: "obs"
    re-chooses which units of each layer go by greedy structured OBS on the pruned model's activations (the
    plan's count per layer and kind stays; plans of learned masks always keep their units); "plan" keeps the
    plan's units. ``inputs``: also refit the projections that read the shifted residual stream (q/k/v,
    gate/up) towards the dense model's outputs, before each sublayer's output projection (the full sequential
    refit)."""

    ridge: float = 0.3
    target: str = "own"  # "own": the dense layer on the pruned inputs; "dense": the dense model's own outputs
    select: str = "obs"
    batch_size: int = 1
    inputs: bool = False

    def validate(self) -> None:
        """Refuse bad values in one line (a ``SettingError`` naming the field)."""
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise SettingError(f"reconstruction ridge {self.ridge!r} must be a finite number > 0", field="ridge")
        if self.target not in RECONSTRUCTION_TARGETS:
            raise SettingError(
                f"reconstruction target {self.target!r} is not one of {', '.join(RECONSTRUCTION_TARGETS)}",
                field="target",
            )
        if self.select not in RECONSTRUCTION_SELECTIONS:
            raise SettingError(
                f"reconstruction selection {self.select!r} is not one of {', '.join(RECONSTRUCTION_SELECTIONS)}",
                field="select",
            )
        if self.batch_size < 1:
            raise SettingError(f"reconstruction batch size {self.batch_size} must be >= 1", field="batch_size")
        if not isinstance(self.inputs, bool):
            raise SettingError(f"reconstruction inputs {self.inputs!r} must be true or false", field="inputs")


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
    router: str = "frozen"  # mixtures of experts: routers frozen (REAP's recipe keeps them) or trained in full

    def validate(self) -> None:
        """Refuse bad values in one line (a ``SettingError`` naming the field)."""
        if self.router not in ROUTER_MODES:
            raise SettingError(f"router {self.router!r} is not one of {', '.join(ROUTER_MODES)}", field="router")
        if self.loss not in LOSSES:
            raise SettingError(f"recovery loss {self.loss!r} is not one of {', '.join(LOSSES)}", field="loss")
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(f"recovery {name} must be >= 1, got {getattr(self, name)}", field=name)
        valid = {"lr": self.lr > 0, "alpha": self.alpha > 0, "temperature": self.temperature > 0,
                 "dropout": 0 <= self.dropout < 1}  # fmt: skip
        if not all(valid.values()):
            raise SettingError(
                f"need lr > 0, alpha > 0, temperature > 0 and 0 <= dropout < 1; got lr={self.lr}, alpha={self.alpha}, "
                f"temperature={self.temperature}, dropout={self.dropout}",
                field=next(name for name, ok in valid.items() if not ok),
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise SettingError(
                f"warmup_steps {self.warmup_steps} must be in [0, steps={self.steps})", field="warmup_steps"
            )
