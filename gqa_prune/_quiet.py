"""Quiet known, harmless import-time messages of optional dependencies (and nothing else).

Importing transformers pulls in torchao when it is installed (GPTQModel depends on it): on a CPU-only
machine torchao warns that its CUDA extensions cannot load, and torch warns about torchao's enum
registration. Both are noise for this package; the loggers get their previous level back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_optional_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
