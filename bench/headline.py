"""The README's headline table, printed from the JSON `bench/quality.py --json` wrote: the defaults against the
peers, one-shot and (where the JSON holds them) after LoRA recovery, at each ratio, with PPL as a multiple of
the dense model's. tests/test_docs.py checks every figure of the README's table against the same JSON.

    python bench/headline.py docs/data/quality-one-shot.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the rows shown, in this order within a ratio: (prefix of the method name in the JSON, name in the table)
SHOWN = (
    ("**gqa-prune defaults**", "**gqa-prune, no flags**"),
    ("FLAP", "FLAP"),
    ("SliceGPT", "SliceGPT"),
    ("Torch-Pruning", "Torch-Pruning"),
    ("ShortGPT", "ShortGPT"),
)


def table(rows: list[dict]) -> str:
    dense = next(row for row in rows if row["method"] == "dense")
    lines = [
        "| method | ratio | parameters | WikiText-2 PPL | × dense | mean acc |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense | – | {dense['parameters']} | {dense['PPL']} | 1.00 | {dense['mean acc']} |",
    ]
    ratios = sorted({row["ratio"] for row in rows if row["method"] != "dense"})
    for ratio in ratios:
        for prefix, shown in SHOWN:
            for row in rows:
                if row["ratio"] != ratio or not row["method"].startswith(prefix) or row["PPL"].startswith("failed"):
                    continue
                name = row["method"].replace(row["method"].split(" + LoRA")[0], shown)
                multiple = float(row["PPL"]) / float(dense["PPL"])
                lines.append(
                    f"| {name} | {ratio} | {row['parameters']} | {row['PPL']} | {multiple:.2f} | {row['mean acc']} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="rows written by bench/quality.py --json")
    print(table(json.loads(parser.parse_args().json.read_text())))


if __name__ == "__main__":
    main()
