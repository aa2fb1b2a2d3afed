"""Calibration blocks and evaluation text: reproducible, sized as asked, built as documented."""

from __future__ import annotations

import json

import pytest
import torch

from gqa_prune.data import (
    calibration_blocks,
    load_calibration,
    read_documents,
    save_calibration,
    wikitext2_test_text,
)
from gqa_prune.errors import GqaPruneError


def test_blocks_are_seeded_and_reproducible(tiny_tokenizer, c4_texts):
    first = calibration_blocks(tiny_tokenizer, c4_texts, 6, 32, seed=0)
    again = calibration_blocks(tiny_tokenizer, c4_texts, 6, 32, seed=0)
    other = calibration_blocks(tiny_tokenizer, c4_texts, 6, 32, seed=1)
    assert first.shape == (6, 32) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_blocks_cut_the_document_stream_without_overlap(tiny_tokenizer):
    documents = ["alpha beta gamma delta", "one two three four five six", "red green blue"]
    blocks = calibration_blocks(tiny_tokenizer, documents, 2, 5, seed=3)
    order = __import__("numpy").random.default_rng(3).permutation(3)
    stream = []
    for index in order:
        stream += tiny_tokenizer(documents[index], add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    assert blocks.flatten().tolist() == stream[:10]


def test_text_shorter_than_asked_is_refused(tiny_tokenizer):
    with pytest.raises(GqaPruneError, match=r"calibration text has \d+ tokens but 50 blocks x 64 tokens need 3,200"):
        calibration_blocks(tiny_tokenizer, ["a short text", "and another"], 50, 64, seed=0)


def test_documents_from_jsonl_txt_and_hf_folder(tmp_path):
    rows = [{"text": "first document"}, {"text": "  "}, {"text": "second document"}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert read_documents(str(tmp_path / "rows.jsonl")) == ["first document", "second document"]
    with pytest.raises(GqaPruneError, match="row 1 has no field 'content' \\(has: text\\)"):
        read_documents(str(tmp_path / "rows.jsonl"), text_field="content")

    (tmp_path / "notes.txt").write_text("para one\nstill one\n\npara two\n\n\n")
    assert read_documents(str(tmp_path / "notes.txt")) == ["para one\nstill one", "para two"]

    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    (dataset_dir / "train.jsonl").write_text((tmp_path / "rows.jsonl").read_text())
    assert read_documents(f"hf:{dataset_dir}", split="train") == ["first document", "second document"]

    with pytest.raises(GqaPruneError, match="text source 'missing.jsonl' is not a file"):
        read_documents("missing.jsonl")


def test_calibration_file_round_trip(tmp_path, tiny_tokenizer, c4_texts):
    blocks = calibration_blocks(tiny_tokenizer, c4_texts, 3, 16, seed=0)
    save_calibration(tmp_path / "calib.safetensors", blocks, {"seed": 0, "source": "c4"})
    loaded, metadata = load_calibration(tmp_path / "calib.safetensors")
    assert torch.equal(loaded, blocks) and metadata == {"seed": 0, "source": "c4"}


def test_wikitext_text_is_built_like_gptq_from_hf_rows(data_dir):
    text = wikitext2_test_text(data_dir)
    # HF rows: "" (blank line), " = Robert Boulter = \n", "", " Robert Boulter is ...\n"; joined by "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    raw_lines = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")[:-1]
    assert len(raw_lines) == 4358
    assert len(text) == sum(len(line) + 1 for line in raw_lines if line.strip()) + 2 * (4358 - 1)
    with pytest.raises(GqaPruneError, match="WikiText-2 test file not found"):
        wikitext2_test_text(data_dir / "nowhere")


def test_named_sources_resolve_offline_or_to_the_hub_and_evaluation_text_is_refused(data_dir):
    from gqa_prune.data import resolve_text_source

    offline = resolve_text_source("c4", data_dir)
    assert offline.source == str(data_dir / "c4" / "sample_c4-rp1.jsonl")
    hub = resolve_text_source("c4", None)
    assert (hub.source, hub.data_files) == ("hf:allenai/c4", "en/c4-train.00000-of-01024.json.gz")
    with pytest.raises(GqaPruneError, match="is evaluation text \\(wikitext-2-raw\\); calibrate on other text"):
        resolve_text_source(str(data_dir / "wikitext-2-raw" / "wiki.test.raw"), data_dir)
