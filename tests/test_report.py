"""Tradeoff table pieces: benchmark TSVs, Markdown, manifest errors."""

from __future__ import annotations

import pandas as pd
import pytest

from gqa_prune.errors import GqaPruneError
from gqa_prune.report import read_benchmark, to_markdown, variant_row

SNAKEMAKE_TSV = (
    "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    "12.5\t0:00:12\t851.4\t900\t800\t810\t0\t1\t95.0\t11.9\n"
)


def test_benchmark_tsv_gives_seconds_and_peak_memory(tmp_path):
    (tmp_path / "b.tsv").write_text(SNAKEMAKE_TSV)
    assert read_benchmark(tmp_path / "b.tsv") == {"s": 12.5, "max_rss_mb": 851.4}


def test_markdown_rounds_for_reading_and_aligns_numbers():
    table = pd.DataFrame(
        {"variant": ["dense", "taylor"], "params": [134515008, 113281344], "ppl": [20.7123, float("nan")]}
    )
    text = to_markdown(table)
    assert text.splitlines()[1] == "|---|---:|---:|"
    assert "| dense | 134,515,008 | 20.71 |" in text and "| taylor | 113,281,344 |  |" in text


def test_missing_artefact_is_named(tmp_path, tiny_model_dir):
    from gqa_prune.sources import stage

    stage(str(tiny_model_dir), tmp_path / "model")
    entry = {"variant": "dense", "model": str(tmp_path / "model"), "ppl": str(tmp_path / "ppl.json")}
    with pytest.raises(GqaPruneError, match="artefact '.*ppl.json' named in the manifest does not exist"):
        variant_row(entry)
    (tmp_path / "ppl.json").write_text('{"perplexity": 12.5, "window": 32, "tokens_scored": 310}')
    row = variant_row(entry)
    assert (row["ppl"], row["linear_bits"], row["criterion"]) == (12.5, 32.0, "-")
    from transformers import AutoModelForCausalLM

    assert row["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())


def test_pareto_front_keeps_only_undominated_points():
    from gqa_prune.report import pareto_mask

    sizes = [100, 80, 80, 50, 60]
    accuracy = [0.60, 0.58, 0.50, 0.40, 0.39]
    # (80, 0.50) is beaten by (80, 0.58); (60, 0.39) by (50, 0.40)
    assert pareto_mask(sizes, accuracy, "min", "max") == [True, True, False, True, False]
    assert pareto_mask([1, 2], [5.0, 5.0], "min", "min") == [True, False]
