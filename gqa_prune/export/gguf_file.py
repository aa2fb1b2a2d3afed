"""Reading GGUF files: their metadata and tensor sizes (``atomic.written_by`` reads the output marker)."""

from __future__ import annotations

import os

import gguf

MARKER_KEY = "gqa_prune.version"  # present in every GGUF gqa-prune writes (llama.cpp's quantizer keeps it)


def read_metadata(path: str | os.PathLike) -> dict:
    """A GGUF file's metadata (without the vocabulary arrays) and each tensor's bytes, elements and type."""
    reader = gguf.GGUFReader(str(path))
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        try:
            values[key] = field.contents()
        except (ValueError, TypeError, IndexError):
            continue
    values["_tensors"] = {
        tensor.name: {"bytes": int(tensor.n_bytes), "elements": int(tensor.n_elements), "type": tensor.tensor_type.name}
        for tensor in reader.tensors
    }
    return values
