"""Settings of ``learn-masks`` (criterion ``l0``), importable without torch: the CLI reads its option
defaults from ``MaskSettings`` and the workflow's config schema states the same values."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .choices import UNIT_KINDS
from .errors import SettingError

CRITERION = "l0"  # the learned criterion's name in importance folders, plans and variant ids
TRAINED_WEIGHTS_DIR = "model"  # where trained weights go inside the output folder (an HF checkpoint)
WEIGHT_TRAINING = ("none", "full", "lora")  # frozen weights (masks only), every weight, or LoRA adapters


@dataclass(frozen=True)
class MaskSettings:
    """How masks are learned. ``ratio``: fraction of attention+MLP parameters to remove."""

    ratio: float
    steps: int = 200
    batch_size: int = 2
    warmup_steps: int = 50  # the target ratio rises linearly from 0 to ``ratio`` over these steps
    mask_lr: float = 0.3  # Adam on the log-alphas (cosine decay to 5 % after the warm-up)
    lambda_lr: float = 1.0  # gradient ascent on the Lagrange multipliers
    lambda2_init: float = 100.0  # lambda2 starts here: its quadratic term damps what lambda1 alone would oscillate
    init_log_alpha: float = 3.0  # P(z > 0) = 0.99, P(z = 1) = 0.80 with the default beta and limits
    beta: float = 2.0 / 3.0  # hard-concrete temperature
    lower: float = -0.1  # stretch limits l < 0 < 1 < r
    upper: float = 1.1
    kinds: tuple[str, ...] = UNIT_KINDS  # unit kinds that get masks; the others stay whole
    channel_multiple: int = 128  # kept MLP widths are multiples of this (as plans keep them)
    train_weights: str = "none"  # none (masks only), full, or lora
    weight_lr: float = 2e-5  # full: AdamW on every weight; lora: on the adapters (use ~1e-4 there)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    gradient_checkpointing: bool = False
    stats_blocks: int = 16  # blocks the dense block influence and the final masked loss are measured on

    @property
    def distribution(self):
        """The ``hard_concrete.HardConcrete`` of these settings (imported lazily: it needs torch)."""
        from .hard_concrete import HardConcrete

        return HardConcrete(self.beta, self.lower, self.upper)

    def validate(self) -> None:
        """Refuse bad values in one line, before any model is loaded."""
        if not 0.0 < self.ratio < 1.0:
            raise SettingError(
                f"ratio {self.ratio} must be in (0, 1): masks are learned to remove something", field="ratio"
            )
        for name in ("steps", "batch_size", "channel_multiple", "lora_rank", "stats_blocks"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if not 0 <= self.warmup_steps <= self.steps:
            raise SettingError(
                f"steps {self.steps} < warm-up {self.warmup_steps} (or a negative warm-up): the target would never "
                "reach the ratio; give --steps >= --warmup-steps >= 0",
                field="warmup_steps",
            )
        for name in ("mask_lr", "lambda_lr", "weight_lr", "lora_alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingError(f"{name} must be a finite number > 0, got {value}", field=name)
        if not (math.isfinite(self.lambda2_init) and self.lambda2_init >= 0):
            raise SettingError(
                f"lambda2_init must be a finite number >= 0, got {self.lambda2_init}", field="lambda2_init"
            )
        if not math.isfinite(self.init_log_alpha):
            raise SettingError(f"init_log_alpha must be finite, got {self.init_log_alpha}", field="init_log_alpha")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < 0.0 and self.upper > 1.0):
            raise SettingError(
                f"the stretch limits need finite lower < 0 < 1 < upper, got {self.lower}, {self.upper}",
                field="upper" if math.isfinite(self.lower) and self.lower < 0.0 else "lower",
            )
        unknown = [kind for kind in self.kinds if kind not in UNIT_KINDS]
        if unknown or not self.kinds:
            name = unknown[0] if unknown else "(none)"
            raise SettingError(f"unit kind {name!r} is not one of {', '.join(UNIT_KINDS)}", field="kinds")
        if self.train_weights not in WEIGHT_TRAINING:
            raise SettingError(
                f"train_weights {self.train_weights!r} is not one of {', '.join(WEIGHT_TRAINING)}",
                field="train_weights",
            )
