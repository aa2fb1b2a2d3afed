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
import tempfile
from collections.abc import Iterator

NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")
# tokenicer (GPTQModel's tokenizer helper) sets these on import and creates /tmp/tokenicer_hf_home
HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


def import_tokenicer_contained() -> None:
    """Import tokenicer once with its cache variables pointing into a scratch folder, then restore the
    environment and remove the folder: our process keeps the user's Hugging Face cache settings, and no
    stray folder is left. transformers and huggingface_hub are imported first, so their cache paths are
    fixed from the user's environment, not from the scratch one."""
    if "tokenicer" in sys.modules or importlib.util.find_spec("tokenicer") is None:
        return
    import huggingface_hub.constants  # noqa: F401
    import transformers  # noqa: F401

    saved = {name: os.environ.get(name) for name in HF_CACHE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="gqa-prune-tokenicer-") as scratch:
        if saved["HF_HOME"] is None:
            os.environ["HF_HOME"] = scratch
        try:
            importlib.import_module("tokenicer")
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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
    import_tokenicer_contained()
    sink = io.StringIO()
    with quiet_optional_imports(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return importlib.import_module(module)
