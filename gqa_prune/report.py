"""The tradeoff table: one row per variant, every number read from a named artefact.

The workflow hands ``aggregate`` a manifest (JSON) naming, per variant, its model folder, plan, perplexity
record, lm-eval results, efficiency figures and benchmark files; the table is built from those files only,
and the manifest is written beside it, so every figure traces back to the artefact it came from. Rows on
a Pareto front (smaller and better than every other row on two axes) are marked and drawn.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .atomic import COMPANION_SUFFIX, check_output, write_json, write_text
from .errors import GqaPruneError
from .gptq_format import linear_bits_per_parameter

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ParetoFront:
    """Two table columns and which way is better on each."""

    x: str
    y: str
    x_goal: str  # "min" or "max"
    y_goal: str
    x_label: str
    y_label: str


PARETO_FRONTS = {
    "bytes_acc": ParetoFront("bytes", "mean_acc", "min", "max", "weights on disk (MB)", "mean accuracy"),
    "bytes_ppl": ParetoFront("bytes", "ppl", "min", "min", "weights on disk (MB)", "WikiText-2 perplexity"),
    "tps_acc": ParetoFront(
        "decode_tokens_per_s", "mean_acc", "max", "max", "decode tokens/s (batch 1)", "mean accuracy"
    ),
}
EFFICIENCY_COLUMNS = (
    "non_embedding_parameters",
    "kv_cache_bytes_per_token",
    "peak_memory_mb",
    "prefill_ms",
    "prompt_tokens_per_s",  # llama.cpp (GGUF variants)
    "decode_tokens_per_s",
    "decode_ideal_tokens_per_s",  # llama.cpp: read bandwidth / bytes read per token
    "decode_fraction_of_ideal",
)


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


def _read_json(path: str | os.PathLike, fields: Sequence[str] = ()) -> dict:
    """An artefact named in the manifest: a JSON object holding ``fields``, or one line saying what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise GqaPruneError(f"artefact {str(file)!r} named in the manifest does not exist")
    try:
        record = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GqaPruneError(
            f"artefact {str(file)!r} is not valid JSON ({error}); re-run the stage that wrote it"
        ) from error
    missing = [name for name in fields if not isinstance(record, dict) or name not in record]
    if missing:
        raise GqaPruneError(
            f"artefact {str(file)!r} lacks {', '.join(map(repr, missing))}; re-run the stage that wrote it"
        )
    return record


REQUIRED_ENTRY_KEYS = ("variant", "model", "ppl")  # a manifest entry: the model and its ppl JSON at least


def primary_metric(task: str, entry: dict) -> str:
    """The accuracy a task contributes to the mean: acc_norm where lm-eval reports it, else acc."""
    return "acc_norm" if "acc_norm" in entry else "acc"


def variant_row(entry: dict) -> dict:
    """One table row from a manifest entry (model, ppl; optional plan, lm_eval, efficiency, benchmarks, and the
    provenance file of a model that is a single file, a GGUF)."""
    missing = [key for key in REQUIRED_ENTRY_KEYS if not entry.get(key)]
    if missing:
        raise GqaPruneError(
            f"the entry has no {', '.join(map(repr, missing))} (needed: {', '.join(REQUIRED_ENTRY_KEYS)})"
        )
    plan, experts = None, False
    if entry.get("plan"):  # a unit plan, or an expert plan (which keeps experts, and has no unit settings)
        experts = "kept_experts" in _read_json(entry["plan"])
        plan = _read_json(entry["plan"], ("criterion", "allocation", "summary") if experts else ("settings", "summary"))
    provenance = _read_json(entry.get("provenance") or Path(entry["model"]) / "gqa_prune.json")
    ppl = _read_json(entry["ppl"], ("perplexity", "window", "tokens_scored"))
    tasks = _read_json(entry["lm_eval"], ("summary",))["summary"] if entry.get("lm_eval") else {}
    efficiency = _read_json(entry["efficiency"]) if entry.get("efficiency") else {}
    summary = plan["summary"] if plan else {}
    if experts:
        settings = {"criterion": plan["criterion"], "strategy": f"experts {plan['allocation']}"}
    else:
        settings = plan["settings"] if plan else {}
    row = {
        "variant": entry["variant"],
        "criterion": settings.get("criterion", "-"),
        "strategy": settings.get("strategy", "-"),
        "ratio": entry.get("ratio", 0.0),
        "recovery": entry.get("recovery", "none"),
        "quant": entry.get("quant", "none"),
        "removed_attn_mlp": summary.get("achieved_ratio", 0.0),
        "params": int(summary.get("params_after", provenance.get("parameters", 0))),
        "bytes": efficiency["bytes"] if "bytes" in efficiency else weight_bytes(entry["model"]),
        "linear_bits": (
            efficiency["linear_bits"] if "linear_bits" in efficiency else linear_bits_per_parameter(entry["model"])
        ),
        "engine": ppl.get("engine", "transformers"),
        **({"removed_experts": summary.get("achieved_expert_ratio", 0.0)} if experts else {}),
        "ppl": ppl["perplexity"],
        "ppl_window": ppl["window"],
        "ppl_tokens": ppl["tokens_scored"],
    }
    accuracies = []
    for task, metrics in sorted(tasks.items()):
        if task == "wikitext":
            row["wikitext_word_ppl"] = metrics["word_perplexity"]
            row["wikitext_docs"] = metrics["items"]
            continue
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                row[f"{task}_{metric}"] = metrics[metric]
                row[f"{task}_{metric}_stderr"] = metrics[f"{metric}_stderr"]
        row[f"{task}_items"] = metrics["items"]
        accuracies.append(metrics[primary_metric(task, metrics)])
    if accuracies:
        row["mean_acc"] = sum(accuracies) / len(accuracies)
    for column in EFFICIENCY_COLUMNS:
        if column in efficiency:
            row[column] = efficiency[column]
    for stage, path in sorted(entry.get("benchmarks", {}).items()):
        figures = read_benchmark(path)
        row[f"{stage}_s"] = figures["s"]
        row[f"{stage}_max_rss_mb"] = figures["max_rss_mb"]
    return row


def pareto_mask(xs: Sequence[float], ys: Sequence[float], x_goal: str, y_goal: str) -> list[bool]:
    """True where no other point is at least as good on both axes and strictly better on one."""
    sign_x = 1 if x_goal == "min" else -1
    sign_y = 1 if y_goal == "min" else -1
    points = [(sign_x * x, sign_y * y) for x, y in zip(xs, ys)]
    mask = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        mask.append(not dominated)
    return mask


def _rows(manifest: dict) -> list[dict]:
    """One row per manifest entry; a bad entry or artefact is one line naming its variant."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("variants"), list) or "model" not in manifest:
        raise GqaPruneError("the manifest must be a JSON object with 'model' and a list of 'variants'")
    rows = []
    for index, entry in enumerate(manifest["variants"]):
        name = entry.get("variant", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        try:
            if not isinstance(entry, dict):
                raise GqaPruneError("the entry is not a JSON object")
            rows.append(variant_row(entry))
        except GqaPruneError as error:
            raise GqaPruneError(f"manifest variant {name!r}: {error}") from error
        except (KeyError, TypeError, ValueError) as error:
            raise GqaPruneError(f"manifest variant {name!r}: a missing or malformed value ({error!r})") from error
    return rows


def tradeoff_table(manifest: dict) -> pd.DataFrame:
    table = pd.DataFrame(_rows(manifest))
    table.insert(0, "model", manifest["model"])
    dense = table.loc[table["variant"] == "dense", "params"]
    if len(dense):
        table.insert(table.columns.get_loc("params") + 1, "params_vs_dense", table["params"] / dense.iloc[0])
    for name, front in PARETO_FRONTS.items():
        if front.x in table and front.y in table:
            known = table[front.x].notna() & table[front.y].notna()
            xs, ys = table.loc[known, front.x].tolist(), table.loc[known, front.y].tolist()
            table[f"pareto_{name}"] = False
            table.loc[table.index[known], f"pareto_{name}"] = pareto_mask(xs, ys, front.x_goal, front.y_goal)
    return table


KIND = "aggregate"  # the sub-command named in the tradeoff table's output markers
SUMMARY_COLUMNS = (
    "variant", "engine", "params", "bytes", "linear_bits", "kv_cache_bytes_per_token", "ppl", "mean_acc",
    "arc_easy_acc_norm", "arc_challenge_acc_norm", "hellaswag_acc_norm", "piqa_acc_norm", "winogrande_acc",
    "wikitext_word_ppl", "prefill_ms", "prompt_tokens_per_s", "decode_tokens_per_s", "decode_fraction_of_ideal",
    "pareto_bytes_acc", "pareto_bytes_ppl", "pareto_tps_acc",
)  # fmt: skip


def _cell(value) -> str:
    if hasattr(value, "item"):  # numpy scalar -> Python scalar
        value = value.item()
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (numbers rounded for reading; the CSV keeps full precision)."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join(
        "---:" if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]) else "---"
        for c in table.columns
    ) + "|"  # fmt: skip
    body = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def to_html(table: pd.DataFrame, notes: Sequence[str], title: str) -> str:
    """A standalone HTML page: the full table (Pareto rows highlighted) and the notes."""
    marks = [column for column in table.columns if column.startswith("pareto_")]
    rows = []
    for record in table.itertuples(index=False):
        on_front = any(getattr(record, column) for column in marks)
        cells = "".join(f"<td>{_cell(value)}</td>" for value in record)
        rows.append(f'<tr class="{"front" if on_front else ""}">{cells}</tr>')
    head = "".join(f"<th>{column}</th>" for column in table.columns)
    items = "".join(f"<li>{note}</li>" for note in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; position: sticky; top: 0; }}
td:nth-child(-n+2) {{ text-align: left; }}
tr.front td {{ background: #eef7ee; }}
</style></head><body>
<h1>{title}</h1>
<p>Highlighted rows lie on at least one Pareto front (pareto_* columns).</p>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
<ul>{items}</ul>
</body></html>
"""


def plot_fronts(table: pd.DataFrame, folder: str | os.PathLike) -> list[Path]:
    """One PNG per Pareto front: every variant as a point, the front as a line."""
    from .plotting import plot_pareto

    written = []
    for name, front in PARETO_FRONTS.items():
        if front.x not in table or front.y not in table:
            continue
        known = table[front.x].notna() & table[front.y].notna()
        path = Path(folder) / f"pareto_{name}.png"
        rows = table.loc[known]
        xs = (rows[front.x] / 1e6 if front.x == "bytes" else rows[front.x]).tolist()
        ys = rows[front.y].tolist()
        wide = min(ys) > 0 and max(ys) / min(ys) > 10  # e.g. perplexities from 19 to 1,500
        plot_pareto(rows["variant"].tolist(), xs, ys, rows[f"pareto_{name}"].tolist(), front.x_label, front.y_label,
                    path, KIND, log_y=wide)  # fmt: skip
        written.append(path)
    return written


def output_paths(csv_path: Path) -> list[Path]:
    """Every file ``write_report`` may write for ``csv_path``."""
    siblings = [csv_path.with_suffix(suffix) for suffix in (COMPANION_SUFFIX, ".md", ".html")]
    return [csv_path, *siblings, *(csv_path.parent / f"pareto_{name}.png" for name in PARETO_FRONTS)]


def write_report(manifest: dict, csv_path: str | os.PathLike) -> pd.DataFrame:
    """Write <stem>.csv/.md/.html, the Pareto PNGs and <stem>.sources.json beside ``csv_path``."""
    csv_path = Path(csv_path)
    for path in output_paths(csv_path):  # all of them before writing any
        check_output(path, is_dir=False, kind=KIND)
    table = tradeoff_table(manifest)
    notes = manifest.get("notes", [])
    write_json(csv_path.with_suffix(COMPANION_SUFFIX), manifest, KIND)  # first: it marks the three below
    write_text(csv_path, table.to_csv(index=False), KIND)
    summary = table[[column for column in SUMMARY_COLUMNS if column in table]]
    write_text(csv_path.with_suffix(".md"), to_markdown(summary) + "".join(f"\n{note}\n" for note in notes), KIND)
    write_text(csv_path.with_suffix(".html"), to_html(table, notes, f"gqa-prune tradeoff: {manifest['model']}"), KIND)
    plot_fronts(table, csv_path.parent)
    return table
