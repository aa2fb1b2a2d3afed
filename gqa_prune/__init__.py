"""gqa-prune: GQA-aware structured pruning of decoder-only LLMs.

Importing the package registers the pruned-model classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads heterogeneous gqa-prune checkpoints in this process.
"""

from ._quiet import quiet_optional_imports

with quiet_optional_imports():
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_gqa_prune import PRUNED_CLASSES

__version__ = "0.1.0"


def _register_pruned_classes() -> None:
    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        # save_pretrained then copies modeling_gqa_prune.py beside the weights and writes auto_map
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")


with quiet_optional_imports():
    _register_pruned_classes()
