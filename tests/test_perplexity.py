"""Perplexity: equals exp(mean token NLL), states its window and token count, refuses too-short text."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model

from gqa_prune.errors import GqaPruneError
from gqa_prune.perplexity import default_window, perplexity

TOKENS = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(0))


def test_perplexity_is_exp_of_mean_window_loss():
    model = tiny_model("llama", 3)
    result = perplexity(model, TOKENS, window=32, text="random ids")
    with torch.no_grad():
        losses = [model(input_ids=window[None], labels=window[None]).loss.item() for window in TOKENS[:192].view(6, 32)]
    assert result.windows == 6 and result.tokens_scored == 6 * 31 and result.tokens_available == 200
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)
    batched = perplexity(model, TOKENS, window=32, text="random ids", batch_size=4)
    assert batched.perplexity == pytest.approx(result.perplexity, rel=1e-5)


def test_max_tokens_caps_the_scored_text():
    result = perplexity(tiny_model("qwen3", 1), TOKENS, window=16, text="t", max_tokens=100)
    assert (result.windows, result.tokens_scored, result.max_tokens) == (6, 90, 100)
    assert "6 windows x 16 tokens, 90 tokens scored" in result.describe()


def test_too_short_text_and_default_window():
    model = tiny_model("llama", 3)
    with pytest.raises(GqaPruneError, match="text has 200 tokens .* fewer than one window of 256"):
        perplexity(model, TOKENS, window=256, text="t")
    assert default_window(model) == 128  # min(2048, max_position_embeddings)
