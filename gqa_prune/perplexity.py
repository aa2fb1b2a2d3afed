"""Perplexity over non-overlapping windows, reported with the window, token count and text construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import GqaPruneError

DEFAULT_WINDOW = 2048


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    window: int  # tokens per window; the first token of each window is context only
    windows: int
    tokens_scored: int  # windows * (window - 1)
    tokens_available: int  # length of the tokenized text before the max_tokens cap
    max_tokens: int | None
    text: str  # how the text was built

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"PPL {self.perplexity:.3f} ({self.windows} windows x {self.window} tokens, "
            f"{self.tokens_scored:,} tokens scored)"
        )


def default_window(model: nn.Module) -> int:
    """min(2048, the model's maximum positions)."""
    return min(DEFAULT_WINDOW, int(getattr(model.config, "max_position_embeddings", DEFAULT_WINDOW)))


def windows_of(token_ids: torch.Tensor, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """The ``len // window`` non-overlapping windows of ``token_ids`` (1-D) that are scored, as rows."""
    if window < 2:
        raise GqaPruneError(f"window {window} is too short; need at least 2 tokens")
    available = int(token_ids.numel())
    usable = min(available, max_tokens) if max_tokens else available
    windows = usable // window
    if windows < 1:
        raise GqaPruneError(f"text has {usable:,} tokens (max_tokens={max_tokens}), fewer than one window of {window}")
    return token_ids[: windows * window].view(windows, window)


def window_nll(logits: torch.Tensor, window_ids: torch.Tensor) -> float:
    """Summed NLL of every token of a window but the first, from that window's logits ([..., tokens, vocab])."""
    logits = logits.float()
    return nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]), window_ids[..., 1:].reshape(-1), reduction="sum"
    ).item()


def result_of(
    total_nll: float, blocks: torch.Tensor, token_ids: torch.Tensor, text: str, max_tokens: int | None
) -> PerplexityResult:
    windows, window = blocks.shape
    scored = windows * (window - 1)
    return PerplexityResult(
        perplexity=math.exp(total_nll / scored),
        mean_nll=total_nll / scored,
        window=window,
        windows=windows,
        tokens_scored=scored,
        tokens_available=int(token_ids.numel()),
        max_tokens=max_tokens,
        text=text,
    )


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int,
    text: str,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """exp(mean NLL) over ``len // window`` non-overlapping windows of ``token_ids`` (1-D), GPTQ-style.

    Every window is scored independently (no carried context); the tail shorter than a window is dropped.
    """
    blocks = windows_of(token_ids, window, max_tokens)
    device = next(model.parameters()).device
    total_nll = 0.0
    with torch.no_grad():
        for batch in tqdm(blocks.split(batch_size), desc=f"perplexity (window {window})", unit="batch"):
            batch = batch.to(device)
            total_nll += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
    return result_of(total_nll, blocks, token_ids, text, max_tokens)
