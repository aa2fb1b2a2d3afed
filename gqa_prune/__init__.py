"""gqa-prune: GQA-aware structured pruning of decoder-only LLMs.

Importing the package registers the pruned-model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads heterogeneous gqa-prune checkpoints in this process. The
registration waits for transformers itself: if it is imported already it happens now, otherwise right after
its import (an import hook), so ``import gqa_prune`` (and ``gqa-prune --help``) does not pay for torch.

The Python API -- ``gqa_prune.score``, ``plan``, ``prune``, ``recover``, ``evaluate`` -- is ``gqa_prune.api``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
API = ("score", "plan", "prune", "recover", "evaluate")  # gqa_prune.api, loaded on first use


def __getattr__(name: str):
    """The Python API (``gqa_prune.score`` ...), imported on first use so that the package import stays cheap."""
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gqa_prune' has no attribute {name!r}")


def _register_pruned_classes() -> None:
    from ._quiet import quiet_optional_imports

    with quiet_optional_imports():
        from transformers import AutoConfig, AutoModelForCausalLM

        from .modeling_gqa_prune import PRUNED_CLASSES, PRUNED_MOE_CLASSES

        for config_class, model_class in (*PRUNED_CLASSES.values(), *PRUNED_MOE_CLASSES.values()):
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
            # save_pretrained then copies modeling_gqa_prune.py beside the weights and writes auto_map
            config_class.register_for_auto_class()
            model_class.register_for_auto_class("AutoModelForCausalLM")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the import of ``transformers`` to register the classes once it is done."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            from ._quiet import quiet_optional_imports

            with quiet_optional_imports():  # transformers may pull in torchao, which is loud on CPU machines
                execute(module)
            _register_pruned_classes()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_pruned_classes()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
