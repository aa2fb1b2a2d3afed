"""Shared fixtures: tiny random models of every supported family, a real small tokenizer, SmolLM2, data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import tiny_model
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GQA_PRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
C4_SHARD = DATA_DIR / "c4" / "sample_c4-rp1.jsonl"


@pytest.fixture(scope="session")
def c4_texts() -> list[str]:
    if not C4_SHARD.is_file():
        pytest.fail(f"shared data not found at {DATA_DIR} (set GQA_PRUNE_DATA_DIR)")
    return [json.loads(line)["text"] for line in C4_SHARD.read_text().splitlines()[:200]]


@pytest.fixture(scope="session")
def tiny_tokenizer(c4_texts) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (96 tokens), trained offline on C4 text in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tokenizer.train_from_iterator(c4_texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def bpe_tokenizer(c4_texts) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with merges, as real ones have (320 tokens: the 256 bytes, 62 merges, 2
    special); llama.cpp's GGUF tokenizer needs the merges, which the 96-token one above has none of."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(c4_texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny Llama (3 query heads per KV head) saved as an HF folder with its tokenizer."""
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M staged from the embedded GGUF once per test session (~30 s)."""
    from gqa_prune.sources import stage

    folder = tmp_path_factory.mktemp("models") / "smollm2-135m"
    stage("embedded:smollm2-135m", folder)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.fail(f"shared data not found at {DATA_DIR} (set GQA_PRUNE_DATA_DIR)")
    return DATA_DIR


def slurm_problem() -> str | None:
    """Why no usable Slurm is here, or None when sbatch works and the node takes jobs."""
    import shutil
    import subprocess

    missing = [tool for tool in ("sbatch", "squeue", "sinfo", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=1200
        ).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo timed out (controller not running?)"
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no node is up (sinfo: {' '.join(states) or 'nothing'})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A working Slurm, or a skip (developer machine) / failure (CI sets GQA_PRUNE_REQUIRE_SLURM=1)."""
    problem = slurm_problem()
    if problem is not None:
        if os.environ.get("GQA_PRUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm is required (GQA_PRUNE_REQUIRE_SLURM=1) but not usable: {problem}")
        pytest.skip(f"no working Slurm: {problem} (start one with tests/slurm/setup.sh)")
