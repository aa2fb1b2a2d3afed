"""The peer for bench/experts.py: llm-compressor's REAP modifier (PyPI ``llmcompressor``), run from its own
virtual environment (it pins transformers <= 5.17, below this project's), on the same test bed and the same
calibration blocks. It imports nothing from gqa_prune.

    <peer venv>/bin/python bench/reap_peer.py --model results/bench/smollm2-moe-... \\
        --blocks results/bench/experts-calib.safetensors --sparsity 0.25 --out results/bench/llmcompressor-reap-0.25

Writes the pruned checkpoint (llm-compressor's own save) and ``peer.json`` (versions, settings, seconds) into
``--out``; bench/experts.py --peer-dirs evaluates it beside gqa-prune's rows.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--blocks", type=Path, required=True, help="safetensors with input_ids [n, seq_len]")
    parser.add_argument("--sparsity", type=float, required=True, help="fraction of every layer's experts to remove")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    blocks = load_file(str(args.blocks))["input_ids"]
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=REAPPruningModifier(
            sparsity=args.sparsity, report_path=str(args.out.parent / f"{args.out.name}.experts.json")
        ),
        max_seq_length=int(blocks.shape[1]),
        num_calibration_samples=int(blocks.shape[0]),
        moe_calibrate_all_experts=False,
    )
    seconds = time.perf_counter() - started
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {
        "peer": "llm-compressor REAPPruningModifier",
        "versions": {name: version(name) for name in ("llmcompressor", "transformers", "torch")},
        "sparsity": args.sparsity,
        "calibration": {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "file": str(args.blocks)},
        "seconds": seconds,
    }
    (args.out / "peer.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
