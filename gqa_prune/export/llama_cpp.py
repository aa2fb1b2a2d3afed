"""Run gqa-prune's GGUF files in llama.cpp (through ``llama-cpp-python``): quantize, logits, perplexity, speed.

Only files that gqa-prune wrote are run (``gqa_prune.version`` in their metadata): their layout, tokenizer
and provenance are known. Logits are computed with an f32 KV cache and without flash attention, so that an
f32 file reproduces the Hugging Face model's logits to float32 rounding; speed is measured as llama.cpp
serves (its default f16 cache).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import GqaPruneError, require
from ..perplexity import PerplexityResult, result_of, window_nll, windows_of
from .gguf_file import MARKER_KEY, read_metadata

logger = logging.getLogger(__name__)

KV_CACHE_BYTES = 2  # llama.cpp's default KV cache type for serving: f16


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line refusal saying how to install the extra."""
    return require("llama_cpp", "gguf", "running or quantizing GGUF files with llama.cpp")


def check_ours(path: str | os.PathLike) -> dict:
    """The metadata of a GGUF file gqa-prune wrote, or a one-line refusal (missing, not GGUF, not ours)."""
    file = Path(path)
    if not file.is_file():
        raise GqaPruneError(f"GGUF file {str(file)!r} does not exist")
    with file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GqaPruneError(f"{str(file)!r} is not a GGUF file (no GGUF magic)")
    try:
        metadata = read_metadata(file)
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise GqaPruneError(f"cannot read GGUF file {str(file)!r}: {error}") from error
    if MARKER_KEY not in metadata:
        raise GqaPruneError(
            f"GGUF file {str(file)!r} was not written by gqa-prune export-gguf (no {MARKER_KEY}); "
            "its layout and tokenizer are unknown, so gqa-prune does not measure it"
        )
    return metadata


def quantize(source: Path, target: Path, file_type: int, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``): ``source`` (f32 GGUF) -> ``target`` of ``file_type``."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads or torch.get_num_threads()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise GqaPruneError(f"llama.cpp could not quantize {str(source)!r} to file type {int(file_type)} ({status})")


def context_length(metadata: dict) -> int:
    architecture = metadata["general.architecture"]
    return int(metadata[f"{architecture}.context_length"])


@contextlib.contextmanager
def open_model(path: str | os.PathLike, n_ctx: int, logits_all: bool, exact: bool, threads: int | None = None):
    """A llama.cpp context on a gqa-prune GGUF; ``exact``: f32 KV cache, no flash attention (for logits)."""
    llama_cpp = require_llama_cpp()
    threads = threads or torch.get_num_threads()
    options = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
    model = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=logits_all,
        n_threads=threads, n_threads_batch=threads, flash_attn=False, verbose=False, **options,
    )  # fmt: skip
    try:
        yield model
    finally:
        model.close()


def logits(path: str | os.PathLike, token_ids: list[int], threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits ([tokens, vocab], float32) for one sequence, computed exactly (f32 cache)."""
    check_ours(path)
    with open_model(path, n_ctx=max(len(token_ids), 8), logits_all=True, exact=True, threads=threads) as model:
        model.eval(list(token_ids))
        return np.array(model.scores[: len(token_ids)], dtype=np.float32)


def tokenize(path: str | os.PathLike, text: str) -> list[int]:
    """The file's own tokenizer on ``text``, with the special tokens it adds (as Hugging Face's ``tokenizer(text)``)."""
    llama_cpp = require_llama_cpp()
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        model.close()


def perplexity(
    path: str | os.PathLike, token_ids: torch.Tensor, window: int, text: str, max_tokens: int | None = None
) -> PerplexityResult:
    """Perplexity from llama.cpp's logits on exactly the windows ``gqa_prune.perplexity`` scores."""
    blocks = windows_of(token_ids, window, max_tokens)
    total_nll = 0.0
    with open_model(path, n_ctx=window, logits_all=True, exact=True) as model:
        for block in tqdm(blocks, desc=f"llama.cpp perplexity (window {window})", unit="window"):
            model.reset()
            model.eval(block.tolist())
            total_nll += window_nll(torch.from_numpy(np.asarray(model.scores[:window])), block)
    return result_of(total_nll, blocks, token_ids, text, max_tokens)


def read_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 10) -> float:
    """Memory read bandwidth in bytes/s on ``threads`` CPU threads: a float32 sum over a buffer far above cache."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
        return buffer.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)


def decode_bytes_per_token(metadata: dict, context: int) -> int:
    """Bytes one batch-1 decode step reads at least: every tensor once (one row of an input embedding that is
    not also the output head; of a mixture of experts' ``*_exps`` tensors, the top-k experts' share) and the
    f16 KV cache of ``context`` tokens."""
    tensors = metadata["_tensors"]
    architecture = metadata["general.architecture"]
    experts = int(metadata.get(f"{architecture}.expert_count") or 0)
    routed = int(metadata.get(f"{architecture}.expert_used_count") or 0) / experts if experts else 1.0
    total = sum(
        info["bytes"] * (routed if name.endswith("_exps.weight") else 1.0)
        for name, info in tensors.items()
        if name != "token_embd.weight"
    )
    embedding = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors
    vocab = int(metadata.get(f"{architecture}.vocab_size") or 0) or 1
    total += embedding["bytes"] if tied else embedding["bytes"] // vocab
    head_dim = int(metadata[f"{architecture}.attention.key_length"])
    kv_heads = metadata[f"{architecture}.attention.head_count_kv"]
    kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * int(metadata[f"{architecture}.block_count"])
    return int(total + context * sum(2 * heads * head_dim * KV_CACHE_BYTES for heads in kv_heads))


def bits_per_weight(metadata: dict) -> float:
    """Stored bits per weight of the file's 2-D tensors (scales included), as llama.cpp reports a file's BPW."""
    matrices = [info for name, info in metadata["_tensors"].items() if not name.endswith(("norm.weight", ".bias"))]
    return 8 * sum(info["bytes"] for info in matrices) / sum(info["elements"] for info in matrices)


def speed(
    path: str | os.PathLike,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    threads: int | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """llama-bench's pp and tg: prompt processing of ``prompt_tokens`` in one batch, and batch-1 decode of
    ``decode_tokens`` from an empty context (tokens/s, median of ``repeats`` after a warm-up), each beside
    its memory-bound ideal on this machine (read bandwidth measured in the same process)."""
    metadata = check_ours(path)
    threads = threads or torch.get_num_threads()
    limit = context_length(metadata)
    if prompt_tokens > limit or decode_tokens > limit:
        raise GqaPruneError(f"{max(prompt_tokens, decode_tokens)} tokens exceed the model's {limit} positions")
    vocab = int(metadata.get(f"{metadata['general.architecture']}.vocab_size") or 2)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=generator).tolist()
    steps = torch.randint(0, vocab, (decode_tokens,), generator=generator).tolist()
    bandwidth = read_bandwidth(threads)  # before llama.cpp's threads exist: they spin for a while after work
    prompt_rates, decode_rates = [], []
    with open_model(
        path, n_ctx=max(prompt_tokens, decode_tokens), logits_all=False, exact=False, threads=threads
    ) as model:
        for run in range(repeats + 1):
            model.reset()
            start = time.perf_counter()
            model.eval(prompt)
            prompt_seconds = time.perf_counter() - start
            model.reset()
            start = time.perf_counter()
            for token in steps:
                model.eval([token])
            decode_seconds = time.perf_counter() - start
            if run:  # the first run warms up
                prompt_rates.append(prompt_tokens / prompt_seconds)
                decode_rates.append(decode_tokens / decode_seconds)
    per_token = decode_bytes_per_token(metadata, context=decode_tokens // 2)
    decode_rate = statistics.median(decode_rates)
    ideal = bandwidth / per_token
    return {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "threads": threads,
        "prompt_tokens_per_s": statistics.median(prompt_rates),
        "decode_tokens_per_s": decode_rate,
        "decode_bytes_per_token": per_token,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "decode_ideal_tokens_per_s": ideal,
        "decode_fraction_of_ideal": decode_rate / ideal,
        "file_bytes": Path(path).stat().st_size,
        "bits_per_weight": bits_per_weight(metadata),
    }
