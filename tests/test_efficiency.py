"""Efficiency figures: parameter counts, KV-cache size, latency measurements."""

from __future__ import annotations

import copy

import torch
from helpers import parameter_count, plan_for, tiny_model

from gqa_prune.efficiency import LatencySettings, kv_cache_bytes_per_token, latency, parameter_counts
from gqa_prune.surgery import apply_plan


def test_parameter_counts_and_kv_cache_follow_the_pruned_shapes():
    dense = tiny_model("qwen3", 3)  # tied embeddings
    counts = parameter_counts(dense)
    assert counts["parameters"] == parameter_count(dense)
    assert counts["non_embedding_parameters"] == parameter_count(dense) - dense.get_input_embeddings().weight.numel()
    # 3 layers x 4 KV groups x (key + value) x head_dim 8 x 4 bytes (fp32)
    assert kv_cache_bytes_per_token(dense) == 3 * 4 * 2 * 8 * 4

    plan = plan_for(dense, protected_layers=(0,))
    pruned = apply_plan(copy.deepcopy(dense), plan)
    kept_groups = sum(len(layer.kept_kv_groups) for layer in plan.layers)
    assert kv_cache_bytes_per_token(pruned) == kept_groups * 2 * 8 * 4 < kv_cache_bytes_per_token(dense)
    assert parameter_counts(pruned)["parameters"] == plan.params_after
    assert kv_cache_bytes_per_token(dense.to(torch.bfloat16)) == 3 * 4 * 2 * 8 * 2


def test_untied_head_is_not_counted_as_non_embedding():
    model = tiny_model("llama", 3)
    counts = parameter_counts(model)
    embedding_and_head = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert counts["parameters"] - counts["non_embedding_parameters"] == embedding_and_head


def test_latency_reports_the_median_of_the_repeats(monkeypatch):
    import gqa_prune.efficiency as efficiency

    ticks = iter(range(1000))  # a fake clock: every reading is one second after the last
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: float(next(ticks)))
    figures = latency(tiny_model("mistral", 4), LatencySettings(prompt_tokens=16, decode_tokens=4, repeats=3, warmup=1))
    # each run reads the clock 4 times: prefill start/end 1 s apart, decode start/end 1 s apart
    assert figures["prefill_ms"] == 1000.0 and figures["decode_tokens_per_s"] == 4.0
