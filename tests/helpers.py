"""Plain helpers for tests: tiny random models of every supported family, plans built from them."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gqa_prune import importance
from gqa_prune.moe import moe_family_for
from gqa_prune.planning import PlanSettings, PruningPlan, build_plan

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
HEADS_PER_GROUP = (1, 3, 4)  # MHA, SmolLM2, Llama-3
LAYOUTS = [(family, ratio) for family in FAMILIES for ratio in HEADS_PER_GROUP]


def tiny_config(family: str, heads_per_group: int, vocab_size: int = 96, kv_groups: int = 4, layers: int = 3):
    """A tiny random config: 4 KV groups of head_dim 8, hidden 48 (divisible by 4, 12 and 16 heads)."""
    config_class, _ = FAMILIES[family]
    extra = {"attention_bias": True} if family == "llama" else {}  # exercises per-unit biases (qwen2 has them always)
    return config_class(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=kv_groups * heads_per_group,
        num_key_value_heads=kv_groups,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=family == "qwen3",
        **extra,
    )


def tiny_model(family: str, heads_per_group: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    _, model_class = FAMILIES[family]
    model = model_class(tiny_config(family, heads_per_group, **kwargs)).eval()
    with torch.no_grad():  # random biases and norms, so that every parameter matters in equivalence tests
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def calibration_ids(vocab_size: int = 96, blocks: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (blocks, length), generator=torch.Generator().manual_seed(seed))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def scores_for(model, criterion: str = "taylor", channel_multiple: int = 8, **options):
    """Real scores of ``model`` on random calibration ids (a copy is scored; the model stays untouched)."""
    vocab_size = model.get_input_embeddings().num_embeddings
    return importance.score(
        copy.deepcopy(model),
        calibration_ids(vocab_size),
        criterion,
        batch_size=2,
        channel_multiple=channel_multiple,
        **options,
    )


def plan_for(
    model, criterion: str = "taylor", attn_ratio: float | None = 0.5, mlp_ratio: float | None = 0.4, **settings
) -> PruningPlan:
    """A plan from real scores of ``model`` (random calibration ids); small channel_multiple for tiny MLPs.

    Width plans by default; pass ``mode="depth"``/``"hybrid"`` with ``ratio`` for the others.
    """
    settings.setdefault("channel_multiple", 8)
    if settings.get("mode", "width") != "width":
        attn_ratio = mlp_ratio = None
    scores = scores_for(model, criterion, settings["channel_multiple"])
    return build_plan(
        scores,
        PlanSettings(attn_ratio=attn_ratio, mlp_ratio=mlp_ratio, criterion=criterion, **settings),
        params_before=parameter_count(model),
    )


def quantizable_model(vocab_size: int, seed: int = 0):
    """A tiny Llama whose every in_features is a multiple of 32 (hidden 96, head_dim 32), for GPTQ kernels."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=512,  # lm-eval's longest tiny-tokenizer items fit (the workflow's max_length)
    )
    return LlamaForCausalLM(config).eval()


def logits_in_fresh_process(
    workdir: Path, inputs: torch.Tensor, load: str, env: dict | None = None
) -> tuple[torch.Tensor, str]:
    """Logits of ``inputs`` from a model loaded by the statement ``load`` (which binds ``model``) in a new
    interpreter that must never import gqa_prune; also returns what that process printed.

    The subprocess guard is generous (20 min): it only catches a hung load, never a slow machine.
    """
    workdir = Path(workdir)
    save_file({"input_ids": inputs.contiguous()}, str(workdir / "inputs.safetensors"))
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        {load}
        assert "gqa_prune" not in sys.modules, "the fresh process must not use the installed package"
        inputs = load_file({str(workdir / "inputs.safetensors")!r})["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=inputs).logits.contiguous()
        save_file({{"logits": logits}}, {str(workdir / "logits.safetensors")!r})
        print(type(model).__module__)
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=environment, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(workdir / "logits.safetensors"))["logits"], done.stdout, done.stderr


# ---------------------------------------------------------------------------------------------- experts
def _moe_families() -> dict:
    """model_type -> (config class, model class, expert-count key, extra config) of the supported MoE families."""
    import transformers as hf

    hybrid = {
        "layer_types": ["mamba", "attention", "mamba"], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
        "mamba_n_groups": 1, "mamba_expand": 2, "shared_intermediate_size": 20,
    }  # fmt: skip
    return {
        "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, "num_local_experts", {}),
        "qwen2_moe": (
            hf.Qwen2MoeConfig,
            hf.Qwen2MoeForCausalLM,
            "num_experts",
            {
                "moe_intermediate_size": 16,
                "shared_expert_intermediate_size": 20,
                "norm_topk_prob": False,
                "mlp_only_layers": [1],
            },
        ),  # fmt: skip
        "qwen3_moe": (
            hf.Qwen3MoeConfig,
            hf.Qwen3MoeForCausalLM,
            "num_experts",
            {"moe_intermediate_size": 16, "norm_topk_prob": True},
        ),  # fmt: skip
        "olmoe": (hf.OlmoeConfig, hf.OlmoeForCausalLM, "num_experts", {}),
        "gpt_oss": (hf.GptOssConfig, hf.GptOssForCausalLM, "num_local_experts", {}),
        "granitemoehybrid": (hf.GraniteMoeHybridConfig, hf.GraniteMoeHybridForCausalLM, "num_local_experts", hybrid),
    }


MOE_FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoehybrid")


def tiny_moe(family: str, seed: int = 0, vocab_size: int = 96, experts: int = 6, top_k: int = 2, **overrides):
    """A tiny random MoE model of ``family`` (3 layers, hidden 32, ``experts`` experts, top-``top_k``; config
    ``overrides``), every parameter perturbed so that routers, biases and norms all matter in equivalence tests."""
    config_class, model_class, experts_key, extra = _moe_families()[family]
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, num_experts_per_tok=top_k,
        **{experts_key: experts},
    )  # fmt: skip
    config = config_class(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "A_log" in name or name.endswith(".D") or "dt_bias" in name:
                continue  # state-space parameters keep their stable initialisation
            parameter.add_(0.1 * torch.randn_like(parameter))
        moe = moe_family_for(config)
        for layer in moe.decoder_layers(model):  # routers that spread tokens over all experts
            if moe.sparse_block(layer) is not None:
                moe.router(moe.sparse_block(layer)).weight.normal_(0.0, 1.0)
    return model
