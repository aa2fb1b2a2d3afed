"""Text sources -> token blocks: calibration blocks (seeded sample) and the WikiText-2 evaluation text."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .atomic import MARKER, atomic_file, marked
from .errors import GqaPruneError

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
WIKITEXT2_TEST = Path("wikitext-2-raw") / "wiki.test.raw"
# folders of a data_dir that hold evaluation text: calibrating on them would leak the test into the model
EVALUATION_FOLDERS = ("wikitext-2-raw", "arc", "hellaswag", "piqa", "winogrande")
WIKITEXT_CONSTRUCTION = (
    'WikiText-2 raw test, GPTQ-style text: "\\n\\n".join(rows), a row being "" for a blank line, else the line + "\\n"'
)
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TextSource:
    """Where calibration text comes from: a local file, or ``hf:<dataset>`` with its split/config/files."""

    source: str
    text_field: str = "text"
    split: str = "train"
    dataset_config: str | None = None
    data_files: str | None = None


# named sources: (file inside an offline data_dir, the same text on the hub)
NAMED_TEXT_SOURCES = {
    "c4": (
        Path("c4") / "sample_c4-rp1.jsonl",
        TextSource("hf:allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz"),
    ),
}


def resolve_text_source(name_or_path: str, data_dir: str | os.PathLike | None, **options) -> TextSource:
    """A named source (``c4``) resolves to ``<data_dir>/...`` offline, or to the hub without a data_dir.

    Anything else is a path or ``hf:`` spec taken as is. Evaluation text is refused.
    """
    if name_or_path in NAMED_TEXT_SOURCES:
        offline_file, hub = NAMED_TEXT_SOURCES[name_or_path]
        if data_dir is None:
            return hub
        resolved = TextSource(str(Path(data_dir) / offline_file), **options)
    else:
        resolved = TextSource(name_or_path, **options)
    if data_dir is not None and not resolved.source.startswith(HF_PREFIX):
        path = Path(resolved.source).resolve()
        for folder in EVALUATION_FOLDERS:
            if path.is_relative_to((Path(data_dir) / folder).resolve()):
                raise GqaPruneError(
                    f"calibration source {name_or_path!r} is evaluation text ({folder}); "
                    "calibrate on other text, e.g. c4"
                )
    return resolved


def read_source(text_source: TextSource) -> list[str]:
    return read_documents(
        text_source.source,
        text_field=text_source.text_field,
        split=text_source.split,
        dataset_config=text_source.dataset_config,
        data_files=text_source.data_files,
    )


def read_documents(
    source: str,
    text_field: str = "text",
    split: str = "train",
    dataset_config: str | None = None,
    data_files: str | None = None,
) -> list[str]:
    """Documents from a local .jsonl/.json/.txt file, or ``hf:<dataset or folder>`` via ``datasets``.

    A text file is split into documents at blank lines; JSON rows contribute their ``text_field``.
    """
    if source.startswith(HF_PREFIX):
        return _read_hf_dataset(source[len(HF_PREFIX) :], text_field, split, dataset_config, data_files)
    path = Path(source).expanduser()
    if not path.is_file():
        raise GqaPruneError(
            f"text source {source!r} is not a file; give a .jsonl/.json/.txt file or hf:<dataset name or folder>"
        )
    if path.suffix in (".jsonl", ".json"):
        return _read_json_rows(path, text_field)
    paragraphs = _read_utf8(path).split("\n\n")
    return [paragraph.strip() for paragraph in paragraphs if paragraph.strip()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GqaPruneError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error


def _read_json_rows(path: Path, text_field: str) -> list[str]:
    raw = _read_utf8(path)
    if path.suffix == ".json" and raw.lstrip().startswith("["):
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError as error:
            raise GqaPruneError(f"{path}: not valid JSON ({error})") from error
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise GqaPruneError(f"{path}: line {number} is not a JSON object ({error.msg})") from error
    texts = []
    for number, row in numbered:
        if not isinstance(row, dict) or text_field not in row:
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise GqaPruneError(f"{path}: row {number} has no field {text_field!r} (has: {fields})")
        if not isinstance(row[text_field], str):
            raise GqaPruneError(
                f"{path}: row {number} field {text_field!r} is {type(row[text_field]).__name__}, expected text"
            )
        if row[text_field].strip():
            texts.append(row[text_field])
    return texts


def _read_hf_dataset(
    name: str, text_field: str, split: str, dataset_config: str | None, data_files: str | None
) -> list[str]:
    import datasets  # heavy import, only needed here

    try:
        files = {split: data_files} if data_files else None
        dataset = datasets.load_dataset(name, dataset_config, split=split, data_files=files)
    except Exception as error:  # datasets raises many types (hub, offline, missing split)
        raise GqaPruneError(f"cannot load dataset {name!r} split {split!r}: {str(error).splitlines()[0]}") from error
    if text_field not in dataset.column_names:
        raise GqaPruneError(
            f"dataset {name!r} has no column {text_field!r} (columns: {', '.join(dataset.column_names)})"
        )
    return [text for text in dataset[text_field] if text.strip()]


def _token_stream(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], order: np.ndarray, needed: int
) -> Iterator[list[int]]:
    """Token ids of documents in the given order, each followed by EOS, until ``needed`` tokens were yielded."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    produced = 0
    for start in range(0, len(order), _TOKENIZE_BATCH):
        batch = [documents[i] for i in order[start : start + _TOKENIZE_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield ids + separator
            produced += len(ids) + len(separator)
            if produced >= needed:
                return


def calibration_blocks(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], n_blocks: int, block_len: int, seed: int
) -> torch.Tensor:
    """``n_blocks`` x ``block_len`` token ids: documents in a seeded random order, joined by EOS, cut in blocks.

    Blocks do not overlap, and the same documents, tokenizer and seed always give the same blocks.
    """
    if n_blocks < 1 or block_len < 2:
        raise GqaPruneError(f"need n_samples >= 1 and seq_len >= 2, got n_samples={n_blocks}, seq_len={block_len}")
    needed = n_blocks * block_len
    order = np.random.default_rng(seed).permutation(len(documents))
    stream: list[int] = []
    for ids in _token_stream(tokenizer, documents, order, needed):
        stream.extend(ids)
    if len(stream) < needed:
        raise GqaPruneError(
            f"calibration text has {len(stream):,} tokens but {n_blocks} blocks x {block_len} tokens need "
            f"{needed:,}: lower n_samples or seq_len, or give more text"
        )
    logger.debug(
        "calibration: %d blocks x %d tokens from %d documents (seed %d)", n_blocks, block_len, len(documents), seed
    )
    return torch.tensor(stream[:needed], dtype=torch.long).view(n_blocks, block_len)


def save_calibration(path: str | os.PathLike, blocks: torch.Tensor, metadata: dict) -> None:
    with atomic_file(path, "calib") as temporary:
        record = json.dumps(marked(metadata, "calib"))  # one key: safetensors orders several at random
        save_file({"input_ids": blocks.contiguous()}, str(temporary), metadata={"gqa_prune": record})


def load_calibration(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Blocks and their metadata from a file written by ``save_calibration``."""
    path = Path(path)
    if not path.is_file():
        raise GqaPruneError(f"calibration file {str(path)!r} does not exist (write it with `gqa-prune calib`)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("gqa_prune", "{}"))
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own types for foreign or truncated files
        raise GqaPruneError(
            f"{path}: not a calibration file written by `gqa-prune calib` ({str(error).splitlines()[0]})"
        ) from error
    blocks = tensors.get("input_ids")
    if blocks is None or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise GqaPruneError(
            f"{path}: not a calibration file written by `gqa-prune calib` (no [blocks, tokens] input_ids)"
        )
    metadata.pop(MARKER, None)
    return blocks, metadata


def wikitext2_test_text(data_dir: str | os.PathLike | None) -> str:
    """The WikiText-2 raw test split as one string, built exactly as GPTQ builds it from the HF rows.

    With ``data_dir`` the file ``<data_dir>/wikitext-2-raw/wiki.test.raw`` is read (blank lines there are a
    single space; the HF rows make them ""); without it the hub dataset ``wikitext-2-raw-v1`` is used.
    """
    if data_dir is None:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    else:
        path = Path(data_dir) / WIKITEXT2_TEST
        if not path.is_file():
            raise GqaPruneError(
                f"WikiText-2 test file not found at {str(path)!r} (data_dir laid out like ../shared/data)"
            )
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        rows = ["" if not line.strip() else line + "\n" for line in lines]
    return "\n\n".join(rows)
