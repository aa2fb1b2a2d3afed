"""How long `gqa-prune --help` and every sub-command's `--help` take in a fresh process (goal: under 1 s).

The CLI builds its parser from torch-free modules (gqa_prune.choices, gqa_prune.settings); torch and
transformers are imported only by the sub-command that runs. Median of --repeats fresh interpreters each.

    python bench/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of ``python <argv>`` in a fresh interpreter."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from gqa_prune.cli import build_parser

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    cli = ["-m", "gqa_prune.cli"]
    print(f"{'command':<32}{'seconds':>10}")
    print(f"{'python -c pass (interpreter)':<32}{seconds(['-c', 'pass'], args.repeats):>10.3f}")
    rows = [("gqa-prune --help", seconds([*cli, "--help"], args.repeats))]
    rows += [(f"gqa-prune {command} --help", seconds([*cli, command, "--help"], args.repeats)) for command in commands]
    for name, value in rows:
        print(f"{name:<32}{value:>10.3f}")
    worst = max(value for _, value in rows)
    print(f"slowest {worst:.3f} s ({'under' if worst < 1 else 'OVER'} the 1 s goal)")


if __name__ == "__main__":
    main()
