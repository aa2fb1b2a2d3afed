"""Calibration blocks a model can take, checked once for every stage that runs a model on them (no I/O)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import GqaPruneError


def check_blocks(model: nn.Module, blocks: torch.Tensor, min_tokens: int = 1, purpose: str = "") -> None:
    """[blocks, tokens] of ids inside the model's vocabulary, no longer than its positions, at least
    ``min_tokens`` long; refused in one line before any work (``purpose`` says who needs ``min_tokens``)."""
    if blocks.dim() != 2 or not blocks.shape[0]:
        raise GqaPruneError(
            f"calibration blocks must be [blocks, tokens] with at least one block, got {list(blocks.shape)}"
        )
    length = int(blocks.shape[1])
    if length < min_tokens:
        raise GqaPruneError(
            f"calibration blocks of {length} tokens are too short: {purpose or 'this stage'} needs {min_tokens} or more"
        )
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0:
        raise GqaPruneError(f"calibration token id {low} is negative; token ids start at 0")
    if high >= vocab:
        raise GqaPruneError(
            f"calibration token id {high} >= vocab size {vocab}: blocks were made with another tokenizer"
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and length > positions:
        raise GqaPruneError(
            f"calibration blocks of {length} tokens exceed the model's {positions} positions "
            "(max_position_embeddings); write shorter ones with `gqa-prune calib --seq-len`"
        )
