"""Learned L0 masks against the default recipe on SmolLM2-135M at 20 %, with LoRA recovery after both, at equal
training tokens: a step is one batch of 2 C4 blocks of 256 tokens for masks and for LoRA alike.

Arms, each through the CLI as a user runs it (cached per folder under --out, so a rerun resumes):

- ``taylor``: ``importance`` (Taylor, 8 x 2048 C4 tokens, seed 0; calibration, not training) -> ``plan --ratio R``
  (hybrid) -> ``prune --calib`` (reconstruction) -> ``recover`` for ``T`` LoRA steps;
- ``l0``: ``learn-masks --ratio R`` for ``M`` steps (masks only, frozen weights) -> ``plan`` (mode learned)
  -> ``prune --calib`` -> ``recover`` for ``T - M`` LoRA steps.

``--budgets`` lists ``T:M`` pairs (total steps : mask steps); the default's first pair is the default LoRA
recovery's budget (50 steps), the others give the masks more. WikiText-2 perplexity (windows of 2048 tokens,
first 16,384 tokens) one-shot (after prune) and after LoRA.

    python bench/learned_masks.py [--ratio 0.2] [--budgets 50:25,150:100,450:400] [--out results/bench/learned]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DATA_DIR, MODEL_DIR, REPO, machine, markdown

from gqa_prune import scores as stored
from gqa_prune.sources import stage

BLOCK_LEN, BATCH = 256, 2
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


class CommandFailed(Exception):
    """A gqa-prune command exited non-zero; the message is its last stderr line (the one-line error)."""


def cli(*args: str | Path) -> float:
    """Run one gqa-prune command in a fresh process; its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gqa_prune.cli", *map(str, args)], env=ENV, stderr=subprocess.PIPE,
                          text=True)  # fmt: skip
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise CommandFailed((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
    return time.perf_counter() - start


def once(done: Path, *args: str | Path) -> float:
    """``cli(*args)`` unless ``done`` exists; the seconds are kept beside it."""
    seconds_file = done.parent / f"{done.name}.seconds"
    if not done.exists():
        seconds_file.write_text(f"{cli(*args):.1f}")
    return float(seconds_file.read_text()) if seconds_file.exists() else float("nan")


def perplexity(model: Path, out: Path) -> float:
    once(out, "ppl", "--model", model, "--data-dir", DATA_DIR, "--window", 2048, "--max-tokens", 16384, "--out", out)
    return json.loads(out.read_text())["perplexity"]


def recover(pruned: Path, blocks: Path, steps: int, out: Path) -> float:
    return once(
        out, "recover", "--model", pruned, "--train-blocks", blocks, "--steps", steps, "--batch-size", BATCH,
        "--warmup-steps", max(1, steps // 10), "--out", out,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--budgets", default="50:25,150:100,450:400", help="total steps : mask steps, comma-separated")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "learned")
    parser.add_argument(
        "--taylor-scores", type=Path, default=None,
        help="reuse this importance folder (Taylor on the same 8 x 2048 blocks, e.g. bench/quality.py's)",
    )  # fmt: skip
    args = parser.parse_args()
    budgets = [tuple(int(part) for part in pair.split(":")) for pair in args.budgets.split(",")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (MODEL_DIR / "config.json").is_file():
        stage("embedded:smollm2-135m", MODEL_DIR)
    calib, train = out / "calib-c4-8x2048.safetensors", out / "train-c4-256.safetensors"
    most = max(total for total, _ in budgets) * BATCH
    once(calib, "calib", "--model", MODEL_DIR, "--source", "c4", "--data-dir", DATA_DIR,
         "--n-samples", 8, "--seq-len", 2048, "--seed", 0, "--out", calib)  # fmt: skip
    once(train, "calib", "--model", MODEL_DIR, "--source", "c4", "--data-dir", DATA_DIR,
         "--n-samples", most, "--seq-len", BLOCK_LEN, "--seed", 1, "--out", train)  # fmt: skip
    tag = f"r{args.ratio:.2f}"
    rows = [{"arm": "dense", "PPL after LoRA": f"{perplexity(MODEL_DIR, out / 'dense.ppl.json'):.2f}"}]

    # the default recipe: scores once, one plan, one pruned model; LoRA for each total budget
    scores = args.taylor_scores or out / "taylor"
    scoring_seconds = once(scores, "importance", "--model", MODEL_DIR, "--calib", calib, "--batch-size", 1,
                           "--curve-blocks", 4, "--out", scores)  # fmt: skip
    if scoring_seconds != scoring_seconds:  # reused folder: the time its scoring recorded
        scoring_seconds = float(stored.load(scores).info.get("seconds", float("nan")))
    plan = out / f"taylor-{tag}.json"
    once(plan, "plan", "--importance", scores, "--ratio", args.ratio, "--out", plan)
    pruned = out / f"taylor-{tag}"
    prune_seconds = once(pruned, "prune", "--model", MODEL_DIR, "--plan", plan, "--calib", calib, "--out", pruned)
    one_shot = perplexity(pruned, out / f"taylor-{tag}.ppl.json")
    for total, _ in budgets:
        recovered = out / f"taylor-{tag}-lora{total}"
        seconds = recover(pruned, train, total, recovered)
        rows.append({
            "arm": "taylor (default) + LoRA", "mask steps": 0, "LoRA steps": total,
            "training tokens": f"{total * BATCH * BLOCK_LEN:,}", "one-shot PPL": f"{one_shot:.2f}",
            "PPL after LoRA": f"{perplexity(recovered, out / f'{recovered.name}.ppl.json'):.2f}",
            "seconds": f"{scoring_seconds + prune_seconds:.0f} + {seconds:.0f}",
        })  # fmt: skip

    for total, mask_steps in budgets:
        masks = out / f"l0-{tag}-m{mask_steps}"
        try:
            mask_seconds = once(masks, "learn-masks", "--model", MODEL_DIR, "--calib", train, "--ratio", args.ratio,
                                "--steps", mask_steps, "--batch-size", BATCH, "--warmup-steps", mask_steps // 4,
                                "--out", masks)  # fmt: skip
        except CommandFailed as error:  # e.g. too few steps to reach the target size: a row that says so
            rows.append({"arm": f"l0 masks: {str(error).removeprefix('gqa-prune learn-masks: error: ')}",
                         "mask steps": mask_steps, "training tokens": f"{total * BATCH * BLOCK_LEN:,}"})  # fmt: skip
            continue
        plan = out / f"{masks.name}.json"
        once(plan, "plan", "--importance", masks, "--ratio", args.ratio, "--out", plan)
        pruned = out / f"{masks.name}-pruned"
        prune_seconds = once(pruned, "prune", "--model", MODEL_DIR, "--plan", plan, "--calib", calib, "--out", pruned)
        one_shot = perplexity(pruned, out / f"{pruned.name}.ppl.json")
        lora_steps = total - mask_steps
        recovered = out / f"{masks.name}-lora{lora_steps}"
        seconds = recover(pruned, train, lora_steps, recovered)
        with open(masks / "training.csv", newline="") as handle:
            expected = float(list(csv.DictReader(handle))[-1]["expected_ratio"])
        rows.append({
            "arm": f"l0 masks + LoRA (expected ratio {expected:.3f})", "mask steps": mask_steps,
            "LoRA steps": lora_steps, "training tokens": f"{total * BATCH * BLOCK_LEN:,}",
            "one-shot PPL": f"{one_shot:.2f}",
            "PPL after LoRA": f"{perplexity(recovered, out / f'{recovered.name}.ppl.json'):.2f}",
            "seconds": f"{mask_seconds + prune_seconds:.0f} + {seconds:.0f}",
        })  # fmt: skip
    print(f"SmolLM2-135M at {args.ratio:.0%} of attention+MLP parameters; {machine()}")
    columns = ["arm", "mask steps", "LoRA steps", "training tokens", "one-shot PPL", "PPL after LoRA", "seconds"]
    print(markdown(rows, columns))
    (out / "table.md").write_text(markdown(rows, columns) + "\n")


if __name__ == "__main__":
    main()
