"""Reading GGUF files: whether gqa-prune wrote one (its marker key), and its metadata and tensor sizes."""

from __future__ import annotations

import os

import gguf

MARKER_KEY = "gqa_prune.version"  # present in every GGUF gqa-prune writes (llama.cpp's quantizer keeps it)


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file that gqa-prune wrote (its metadata has the marker key)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        return MARKER_KEY in gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError, IndexError, KeyError):
        return False


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
