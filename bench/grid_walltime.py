"""Wall time and peak memory per stage of a workflow run, from Snakemake's benchmark files.

    python bench/grid_walltime.py [results/smollm2-135m]

Reads every ``benchmarks/<stage>/*.tsv`` (and ``benchmarks/<stage>.tsv``) under the results folder and prints,
per stage, the number of jobs, their total / mean / longest wall time and the largest peak resident memory.
The total is CPU-job time summed; with --cores > 1 jobs overlap, so the run's elapsed time can be shorter.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from gqa_prune.report import read_benchmark

STAGE_ORDER = ("stage", "calib", "importance", "plan", "prune", "ppl", "aggregate")


def stage_figures(results: Path) -> dict[str, list[dict[str, float]]]:
    figures: dict[str, list[dict[str, float]]] = defaultdict(list)
    benchmarks = results / "benchmarks"
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        relative = tsv.relative_to(benchmarks)
        stage = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        figures[stage].append(read_benchmark(tsv))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("results/smollm2-135m"))
    args = parser.parse_args()
    figures = stage_figures(args.results)
    if not figures:
        raise SystemExit(f"no benchmark files under {args.results}/benchmarks; run the workflow first")
    order = sorted(figures, key=lambda stage: (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 99, stage))
    print(f"{'stage':<12}{'jobs':>6}{'total s':>10}{'mean s':>10}{'max s':>10}{'max RSS MB':>12}")
    for stage in order:
        times = [figure["s"] for figure in figures[stage]]
        peak = max(figure["max_rss_mb"] for figure in figures[stage])
        mean = sum(times) / len(times)
        print(f"{stage:<12}{len(times):>6}{sum(times):>10.1f}{mean:>10.1f}{max(times):>10.1f}{peak:>12.0f}")
    total = sum(figure["s"] for stage in figures.values() for figure in stage)
    print(f"{'all':<12}{sum(map(len, figures.values())):>6}{total:>10.1f}   (job time summed; {args.results})")


if __name__ == "__main__":
    main()
