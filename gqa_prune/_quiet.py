"""Quiet known, harmless messages of optional dependencies (and nothing else).

Importing transformers pulls in torchao when it is installed (GPTQModel depends on it): on a CPU-only
machine torchao warns that its CUDA extensions cannot load, and torch warns about torchao's enum
registration. GPTQModel prints a banner and environment notes when it is first imported (peft imports it
too when it dispatches LoRA layers). All of that is noise on gqa-prune's paths; loggers get their previous
level back afterwards, and only the import itself is silenced.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import sys
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


def import_quietly(module: str):
    """Import ``module`` with its import-time printing discarded (GPTQModel's banner); None if not installed."""
    if module in sys.modules:
        return sys.modules[module]
    if importlib.util.find_spec(module) is None:
        return None
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    sink = io.StringIO()
    with quiet_optional_imports(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return importlib.import_module(module)
