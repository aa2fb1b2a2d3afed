"""The GPU tier runs where only the checkout travels (no ../shared/data): its tokenizer is trained on
generated text instead of the C4 shard."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def c4_texts() -> list[str]:
    """Seeded word salad standing in for C4 (the byte-level tokenizer only needs some text to merge on)."""
    words = "the model prunes groups of heads and channels while the loss stays low on every layer".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)]
