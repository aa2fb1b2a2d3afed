"""The tradeoff table: one row per variant, every number read from a named artefact.

The workflow hands ``aggregate`` a manifest (JSON) naming, per variant, its model folder, plan, perplexity
record and benchmark files; the table is built from those files only, and the manifest is written beside
it, so every figure traces back to the artefact it came from.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd

from .atomic import write_json, write_text
from .errors import GqaPruneError
from .quantize import linear_bits_per_parameter

WEIGHT_SUFFIXES = (".safetensors",)


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of the weight files of a model folder (what a user downloads and loads)."""
    return sum(path.stat().st_size for path in Path(model_dir).iterdir() if path.suffix in WEIGHT_SUFFIXES)


def read_benchmark(path: str | os.PathLike) -> dict[str, float]:
    """Wall time (s) and peak resident memory (MB) from a Snakemake benchmark TSV (first repeat)."""
    with open(path, newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {
        "s": float(row["s"]),
        "max_rss_mb": float(row["max_rss"]) if row["max_rss"] not in ("", "-") else float("nan"),
    }


def _read_json(path: str | os.PathLike) -> dict:
    file = Path(path)
    if not file.is_file():
        raise GqaPruneError(f"artefact {str(file)!r} named in the manifest does not exist")
    return json.loads(file.read_text())


def variant_row(entry: dict) -> dict:
    """One table row from a manifest entry: {variant, model, ppl, plan?, ratio?, recovery?, quant?, benchmarks?}."""
    plan = _read_json(entry["plan"]) if entry.get("plan") else None
    provenance = _read_json(Path(entry["model"]) / "gqa_prune.json")
    ppl = _read_json(entry["ppl"])
    settings = plan["settings"] if plan else {}
    summary = plan["summary"] if plan else {}
    row = {
        "variant": entry["variant"],
        "criterion": settings.get("criterion", "-"),
        "strategy": settings.get("strategy", "-"),
        "ratio": entry.get("ratio", 0.0),
        "recovery": entry.get("recovery", "none"),
        "quant": entry.get("quant", "none"),
        "removed_attn_mlp": summary.get("achieved_ratio", 0.0),
        "params": int(summary.get("params_after", provenance.get("parameters", 0))),
        "bytes": weight_bytes(entry["model"]),
        "linear_bits": linear_bits_per_parameter(entry["model"]),
        "ppl": ppl["perplexity"],
        "ppl_window": ppl["window"],
        "ppl_tokens": ppl["tokens_scored"],
    }
    for stage, path in sorted(entry.get("benchmarks", {}).items()):
        figures = read_benchmark(path)
        row[f"{stage}_s"] = figures["s"]
        row[f"{stage}_max_rss_mb"] = figures["max_rss_mb"]
    return row


def tradeoff_table(manifest: dict) -> pd.DataFrame:
    table = pd.DataFrame([variant_row(entry) for entry in manifest["variants"]])
    table.insert(0, "model", manifest["model"])
    dense = table.loc[table["variant"] == "dense", "params"]
    if len(dense):
        table.insert(table.columns.get_loc("params") + 1, "params_vs_dense", table["params"] / dense.iloc[0])
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (numbers rounded for reading; the CSV keeps full precision)."""

    def cell(value) -> str:
        if hasattr(value, "item"):  # numpy scalar -> Python scalar
            value = value.item()
        if isinstance(value, float):
            if value != value:  # NaN
                return ""
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---" for c in table.columns) + "|"
    body = ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_tables(manifest: dict, csv_path: str | os.PathLike, markdown_path: str | os.PathLike) -> pd.DataFrame:
    """Write the table as CSV and Markdown, and the manifest beside them (``<csv stem>.sources.json``)."""
    table = tradeoff_table(manifest)
    write_text(csv_path, table.to_csv(index=False))
    notes = manifest.get("notes", [])
    write_text(markdown_path, to_markdown(table) + "".join(f"\n{note}\n" for note in notes))
    write_json(Path(csv_path).with_suffix(".sources.json"), manifest)
    return table
