"""A Llama-3.1-8B-shaped model (random bf16 weights: costs, not quality) on one CUDA GPU: compiled
static-cache decode of the dense and the 20 %-pruned model at batch 1 and 16 beside their memory-bound ideal,
Taylor scoring, and least-squares reconstruction's wall time and peak memory.

    PYTHONPATH=. python bench/gpu_8b.py [--out gpu_8b.json] [--budget-s 480]

Writes the figures as JSON (after every step, so a cut-off run keeps what it measured) and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gqa_prune import importance
from gqa_prune.efficiency import LatencySettings, decode_bytes_per_step, measure
from gqa_prune.planning import PlanSettings, build_plan
from gqa_prune.reconstruct import ReconstructionSettings, reconstruct
from gqa_prune.surgery import apply_plan

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_8b.json"))
    parser.add_argument("--budget-s", type=float, default=480, help="skip later steps past this much wall time")
    parser.add_argument("--blocks", type=int, default=8, help="calibration blocks of 2048 random tokens")
    args = parser.parse_args()
    start = time.perf_counter()
    figures: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def record(key: str, value) -> None:
        figures[key] = value
        args.out.write_text(json.dumps(figures, indent=2, sort_keys=True))
        print(key, json.dumps(value), flush=True)

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B)).to(torch.bfloat16).eval()
    record("parameters", sum(p.numel() for p in model.parameters()))
    settings = LatencySettings(prompt_tokens=256, decode_tokens=64, repeats=3, warmup=2, batch_sizes=(1, 16))
    dense = measure(model, settings, 0.0)
    record("dense", dense)
    context = settings.prompt_tokens + settings.decode_tokens // 2
    dense_bytes = {batch: decode_bytes_per_step(model, batch, context) for batch in settings.batch_sizes}
    blocks = torch.randint(
        0, LLAMA_31_8B["vocab_size"], (args.blocks, 2048), generator=torch.Generator().manual_seed(0)
    )

    begin = time.perf_counter()
    scores = importance.score(model, blocks, "taylor", batch_size=2, curves=False)
    torch.cuda.synchronize()
    record("taylor_seconds", time.perf_counter() - begin)
    plan = build_plan(scores, PlanSettings(0.2, 0.2))
    record("plan_params_after", plan.params_after)

    torch.cuda.reset_peak_memory_stats()
    plan, report = reconstruct(model, plan, blocks, ReconstructionSettings(batch_size=1))
    record("reconstruction", {k: report[k] for k in ("seconds", "peak_memory_mb", "calibration_tokens")})
    apply_plan(model, plan)
    torch.cuda.empty_cache()
    if time.perf_counter() - start > args.budget_s:
        record("skipped", "pruned decode: over the time budget")
        return
    pruned = measure(model, settings, 0.0)
    record("pruned", pruned)
    for batch in settings.batch_sizes:
        key = f"decode_tokens_per_s_b{batch}"
        pruned_bytes = decode_bytes_per_step(model, batch, context)
        record(
            f"speedup_b{batch}",
            {
                "measured": pruned[key] / dense[key],
                "bytes_ratio": dense_bytes[batch] / pruned_bytes,
                "dense_bytes_per_step": dense_bytes[batch],
                "pruned_bytes_per_step": pruned_bytes,
            },
        )


if __name__ == "__main__":
    main()
