"""Serving in llama.cpp: a dense and a pruned model exported to GGUF, run by llama.cpp, side by side.

    python bench/gguf_serving.py [--dense resources/models/smollm2-135m]
        [--pruned results/smollm2-135m/pruned/taylor-hybrid-r0.20] [--json results/bench/gguf-serving.json]

For each model: WikiText-2 perplexity through the Hugging Face path and through llama.cpp (f32, f16, Q8_0,
Q4_K_M files) on the same windows; then llama.cpp's prompt processing (512 tokens) and batch-1 decode
(128 tokens) tokens/s of the f32 and Q4_K_M files, each beside its memory-bound ideal (the memory read
bandwidth measured in this process over the bytes a decode step reads). Run it alone: two jobs on the
same cores make every timing meaningless. The defaults are what `make demo` writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import DATA_DIR, REPO, machine, markdown

from gqa_prune.data import WIKITEXT_CONSTRUCTION, wikitext2_test_text
from gqa_prune.export import llama_cpp
from gqa_prune.export.gguf import export_gguf
from gqa_prune.perplexity import perplexity
from gqa_prune.sources import load_model, load_tokenizer

PPL_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
SPEED_TYPES = ("f32", "q4_k_m")


def measure(name: str, folder: Path, work: Path, window: int, max_tokens: int) -> list[dict]:
    text = wikitext2_test_text(DATA_DIR)
    tokens = load_tokenizer(folder)(text, return_tensors="pt", verbose=False).input_ids[0]
    hf = perplexity(load_model(folder, dtype="float32"), tokens, window, WIKITEXT_CONSTRUCTION, max_tokens=max_tokens)
    rows = [{"model": name, "file": "HF folder (transformers, fp32)", "ppl": f"{hf.perplexity:.3f}"}]
    for gguf_type in PPL_TYPES:
        file = work / f"{name}-{gguf_type}.gguf"
        if not file.is_file():
            export_gguf(folder, file, gguf_type)
        cpp_tokens = torch.tensor(llama_cpp.tokenize(file, text))
        assert torch.equal(cpp_tokens, tokens), "llama.cpp tokenizes WikiText-2 differently"
        result = llama_cpp.perplexity(file, cpp_tokens, window, WIKITEXT_CONSTRUCTION, max_tokens=max_tokens)
        row = {
            "model": name,
            "file": f"{gguf_type} GGUF (llama.cpp)",
            "MiB": f"{file.stat().st_size / 2**20:.1f}",
            "bits/weight": f"{llama_cpp.bits_per_weight(llama_cpp.check_ours(file)):.2f}",
            "ppl": f"{result.perplexity:.3f}",
            "vs HF": f"{result.perplexity / hf.perplexity - 1:+.3%}",
            "_ppl": result.perplexity,
            "_hf_ppl": hf.perplexity,
        }
        rows.append(row)
    return rows


def speeds(name: str, work: Path, threads: int) -> list[dict]:
    rows = []
    for gguf_type in SPEED_TYPES:
        figures = llama_cpp.speed(work / f"{name}-{gguf_type}.gguf", threads=threads)
        rows.append({"model": name, "type": gguf_type, **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=REPO / "resources" / "models" / "smollm2-135m")
    parser.add_argument(
        "--pruned", type=Path, default=REPO / "results" / "smollm2-135m" / "pruned" / "taylor-hybrid-r0.20"
    )
    parser.add_argument("--work", type=Path, default=REPO / "results" / "bench" / "gguf")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"dense": args.dense, "pruned": args.pruned}

    quality = []
    for name, folder in models.items():
        quality += measure(name, folder, args.work, args.window, args.max_tokens)
    speed = [row for name in models for row in speeds(name, args.work, args.threads)]
    dense_speed = {row["type"]: row for row in speed if row["model"] == "dense"}
    for row in speed:
        base = dense_speed[row["type"]]
        row["bytes ratio"] = base["decode_bytes_per_token"] / row["decode_bytes_per_token"]
        row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]

    print(f"# llama.cpp serving: {machine()}, llama.cpp threads {args.threads}")
    print(
        f"\nWikiText-2 raw test, windows of {args.window}, first {args.max_tokens:,} tokens; the same windows in both"
    )
    print("engines\n")
    print(markdown(quality, ["model", "file", "MiB", "bits/weight", "ppl", "vs HF"]))
    table = [
        {
            "model": row["model"],
            "type": row["type"],
            "MB read/token": f"{row['decode_bytes_per_token'] / 1e6:.1f}",
            "read GB/s": f"{row['read_bandwidth_gb_s']:.1f}",
            "pp512 tok/s": f"{row['prompt_tokens_per_s']:.0f}",
            "tg128 tok/s": f"{row['decode_tokens_per_s']:.1f}",
            "ideal tok/s": f"{row['decode_ideal_tokens_per_s']:.1f}",
            "of ideal": f"{row['decode_fraction_of_ideal']:.0%}",
            "decode speedup vs dense": f"{row['speedup']:.3f}",
            "bytes ratio": f"{row['bytes ratio']:.3f}",
            "speedup / bytes ratio": f"{row['speedup'] / row['bytes ratio']:.2f}",
        }
        for row in speed
    ]
    print("\nllama.cpp speed; ideal = memory read bandwidth (measured in this process before each file)")
    print("/ bytes read per token\n")
    print(markdown(table, list(table[0])))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "quality": quality, "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
