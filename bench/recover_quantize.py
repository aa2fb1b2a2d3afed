"""Recovery throughput and quantization cost of a workflow run, read from its artefacts.

    python bench/recover_quantize.py [results/smollm2-135m]

Per recovered variant: steps, training tokens, training seconds and tokens/s (from training_loss.csv),
the job's wall time and peak memory (Snakemake benchmark). Per quantized variant: the job's wall time and
peak memory, bits per linear weight, and weight bytes against those of the model it was made from.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from gqa_prune.report import read_benchmark, weight_bytes


def recovery_rows(results: Path) -> list[str]:
    rows = []
    for folder in sorted((results / "recovered").glob("*")):
        with open(folder / "training_loss.csv", newline="") as handle:
            steps = list(csv.DictReader(handle))
        tokens, seconds = int(steps[-1]["tokens"]), float(steps[-1]["seconds"])
        job = read_benchmark(results / "benchmarks" / "recover" / f"{folder.name}.tsv")
        rows.append(
            f"{folder.name:<40}{len(steps):>6}{tokens:>9,}{seconds:>10.1f}{tokens / seconds:>10.1f}"
            f"{job['s']:>10.1f}{job['max_rss_mb']:>10.0f}"
        )
    return rows


def quantization_rows(results: Path) -> list[str]:
    rows = []
    for folder in sorted((results / "quantized").glob("*")):
        record = json.loads((folder / "gqa_prune.json").read_text())["quantization"]
        job = read_benchmark(results / "benchmarks" / "quantize" / f"{folder.name}.tsv")
        quant = f"{record['method']}-w{record['bits']}g{record['group_size']}"
        base = folder.name.removesuffix(f"-{quant}")
        base_dir = (
            results.parents[1] / "resources" / "models" / results.name
            if base == "dense"
            else results / ("recovered" if "-lora-" in base else "pruned") / base
        )
        ratio = weight_bytes(folder) / weight_bytes(base_dir) if base_dir.is_dir() else float("nan")
        rows.append(
            f"{folder.name:<44}{job['s']:>9.1f}{job['max_rss_mb']:>10.0f}{record['bits_per_parameter']:>8.3f}"
            f"{weight_bytes(folder) / 1e6:>10.1f}{ratio:>8.3f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("results/smollm2-135m"))
    args = parser.parse_args()
    recovered, quantized = recovery_rows(args.results), quantization_rows(args.results)
    if not recovered and not quantized:
        raise SystemExit(f"no recovered or quantized variants under {args.results}; run the workflow first")
    if recovered:
        print(
            f"{'recovered variant':<40}{'steps':>6}{'tokens':>9}{'train s':>10}{'tok/s':>10}{'job s':>10}{'RSS MB':>10}"
        )
        print("\n".join(recovered))
    if quantized:
        print(f"\n{'quantized variant':<44}{'job s':>9}{'RSS MB':>10}{'bits':>8}{'MB':>10}{'x base':>8}")
        print("\n".join(quantized))


if __name__ == "__main__":
    main()
