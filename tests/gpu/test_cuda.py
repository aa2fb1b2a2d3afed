"""The GPU tier (marker ``gpu``): the CUDA paths of importance, plan, prune, checkpoints, reconstruction,
recovery, quantization and efficiency. Skipped without CUDA; run on a CUDA machine with

    PYTHONPATH=. python -m pytest -m gpu tests/gpu -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import calibration_ids, parameter_count, scores_for, tiny_model

from gqa_prune import importance
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.surgery import apply_plan, apply_plan_as_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="session")
def c4_texts() -> list[str]:
    """Seeded word salad instead of the C4 shard: only the checkout travels to a GPU machine (no
    ../shared/data), and the tiny byte-level tokenizer needs only some text to merge on."""
    import random

    words = "the model prunes groups of heads and channels while the loss stays low on every layer".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)]


BLOCKS = calibration_ids(blocks=8, length=32, seed=4)
INPUTS = calibration_ids(blocks=2, length=12, seed=1)


def _model(dtype=torch.float32, layers: int = 4):
    return tiny_model("llama", 3, layers=layers).to(CUDA, dtype)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_taylor_scores_on_cuda_match_the_cpu(checkpointing):
    cpu = importance.score(tiny_model("llama", 3, layers=4), BLOCKS, "taylor", batch_size=2, curves=False)
    gpu = importance.score(_model(), BLOCKS, "taylor", batch_size=2, curves=False, gradient_checkpointing=checkpointing)
    for kind in ("gqa_group", "mlp_channel"):
        for a, b in zip(cpu.units[kind], gpu.units[kind]):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_fisher_and_hybrid_plans_on_cuda():
    model = _model(layers=5)
    scores = importance.score(model, BLOCKS, "fisher", batch_size=2, channel_multiple=8)
    plan = build_plan(scores, PlanSettings(ratio=0.3, mode="hybrid", channel_multiple=8), parameter_count(model))
    reference = apply_plan_as_mask(copy.deepcopy(model), plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert (pruned(INPUTS.to(CUDA)).logits - reference(INPUTS.to(CUDA)).logits).abs().max() <= 1e-4


def test_prune_save_and_reload_in_bf16_on_cuda(tmp_path, tiny_tokenizer):
    from gqa_prune.checkpoint import save_pruned
    from gqa_prune.sources import load_model

    model = tiny_model("qwen3", 4, layers=4, vocab_size=len(tiny_tokenizer)).to(CUDA, torch.bfloat16)
    plan = build_plan(scores_for(model), PlanSettings(0.5, 0.25, channel_multiple=8), parameter_count(model))
    apply_plan(model, plan)
    with torch.no_grad():
        expected = model(INPUTS.to(CUDA)).logits
    save_pruned(model, tiny_tokenizer, plan, tmp_path / "pruned", source="org/tiny")
    reloaded = load_model(tmp_path / "pruned", dtype="bfloat16", device="cuda")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a.to(CUDA), b), name  # bit for bit
    with torch.no_grad():  # same weights; the fresh model may run another attention kernel: bf16 rounding apart
        torch.testing.assert_close(reloaded(INPUTS.to(CUDA)).logits, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruction_on_cuda_never_worse_than_slicing_and_matches_the_cpu(dtype):
    from gqa_prune.reconstruct import ReconstructionSettings, reconstruct

    cpu_model = tiny_model("llama", 3, layers=4)
    plan = build_plan(scores_for(cpu_model), PlanSettings(0.5, 0.4, channel_multiple=8), parameter_count(cpu_model))
    gpu_model = copy.deepcopy(cpu_model).to(CUDA, dtype)
    applied, report = reconstruct(copy.deepcopy(gpu_model), plan, BLOCKS, ReconstructionSettings())  # OBS choice
    assert [len(layer.kept_mlp_channels) for layer in applied.layers] == [
        len(layer.kept_mlp_channels) for layer in plan.layers
    ]
    for entry in report["layers"]:
        for name in ("o_proj", "down_proj"):
            if name in entry:
                assert entry[name]["refit_error"] <= entry[name]["sliced_error"] * (1 + 1e-6)
    assert report["peak_memory_mb"] > 0
    reconstruct(gpu_model, plan, BLOCKS, ReconstructionSettings(select="plan"))  # the same units on both devices
    reconstruct(cpu_model, plan, BLOCKS, ReconstructionSettings(select="plan"))
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(b.float().cpu(), a, rtol=tolerance, atol=tolerance)


def test_lora_recovery_in_bf16_with_gradient_checkpointing_on_cuda():
    from gqa_prune.recovery import RecoverySettings, lora_model, merge, train

    model = _model(torch.bfloat16)
    settings = RecoverySettings(steps=4, warmup_steps=1, gradient_checkpointing=True, lr=1e-3)
    peft_model = lora_model(model, settings)
    history = train(peft_model, BLOCKS, settings)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(step.loss)) for step in history)
    merged = merge(peft_model, settings)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_compiled_static_cache_decode_reports_figures_beside_their_ideal():
    from gqa_prune.efficiency import LatencySettings, measure

    model = _model(torch.bfloat16).eval()
    figures = measure(
        model, LatencySettings(prompt_tokens=16, decode_tokens=8, repeats=2, warmup=1, batch_sizes=(1, 4)), 0.0
    )
    for batch in (1, 4):
        assert figures[f"decode_tokens_per_s_b{batch}"] > 0
        assert figures[f"decode_ideal_tokens_per_s_b{batch}"] > 0
    assert figures["copy_bandwidth_gb_s"] > 10 and figures["device"].startswith("cuda")


def test_gptq_quantization_on_cuda(tmp_path, tiny_tokenizer):
    gptqmodel = pytest.importorskip(
        "gptqmodel", reason="GPTQModel is not installed here (no binary wheel for this CUDA/Python; see docs/gpu.md)"
    )
    from helpers import quantizable_model

    from gqa_prune.quantize import QuantSettings, quantize_checkpoint
    from gqa_prune.sources import load_model

    model = quantizable_model(len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    quantize_checkpoint(
        tmp_path / "dense",
        tmp_path / "gptq",
        QuantSettings("gptq", 4, 32),
        calibration_ids(len(tiny_tokenizer), 16, 32),
    )
    quantized = load_model(tmp_path / "gptq", device="cuda")
    with torch.no_grad():
        assert torch.isfinite(quantized(INPUTS.to(CUDA)).logits).all()
    assert gptqmodel is not None
