"""Downstream evaluation with lm-eval on an already-loaded model (dense, pruned, recovered or quantized).

Online, tasks are lm-eval's own (`arc_easy`, `hellaswag`, `wikitext`, ...). Offline (a ``data_dir`` laid out
like ../shared/data), each file is converted at run time into the dataset schema lm-eval's task expects,
and a task YAML that *includes lm-eval's installed task definition* swaps only the data source: prompts,
choices, metrics and helper functions stay lm-eval's own. How close each offline task is to the hub one
is stated in ``OFFLINE_TASKS`` (and in the data README).
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import WIKITEXT2_TEST
from .errors import GqaPruneError, require

logger = logging.getLogger(__name__)

# lm-eval's metrics per task, in the order the table shows them
TASK_METRICS = {
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5}


@dataclass(frozen=True)
class OfflineTask:
    lm_eval_yaml: str  # lm-eval's own task definition, relative to lm_eval/tasks
    split: str  # the split lm-eval evaluates
    files: tuple[str, ...]  # inputs under data_dir
    convert: Callable[..., Iterator[dict]]  # data_dir files -> rows in lm-eval's dataset schema
    fidelity: str


def _arc(path: Path) -> Iterator[dict]:
    for line in path.read_text().splitlines():
        row = json.loads(line)
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        yield {
            "question": row["query"].removeprefix("Question: "),
            "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]],
        }


def _hellaswag(path: Path) -> Iterator[dict]:
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    for start in range(0, len(lines) - 5, 6):
        context, label, *endings = lines[start : start + 6]
        activity_label, _, ctx = context.partition(": ")
        # ctx_a/ctx_b are joined in the file; lm-eval capitalises ctx_b, which cannot be recovered here
        yield {"activity_label": activity_label, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label}


def _piqa(valid: Path, labels: Path) -> Iterator[dict]:
    answers = labels.read_text().split()
    for line, answer in zip(valid.read_text().splitlines(), answers, strict=True):
        row = json.loads(line)
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(answer)}


def _winogrande(path: Path) -> Iterator[dict]:
    """Rebuild lm-eval's {sentence, option1, option2, answer}: the scored strings come out identical."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        first, second = row["context_options"]
        common = os.path.commonprefix([first, second])
        if "_" in common:
            raise GqaPruneError(f"winogrande context contains '_', which lm-eval uses as the blank: {common!r}")
        yield {
            "sentence": f"{common}_ {row['continuation']}",
            "option1": first[len(common) :],
            "option2": second[len(common) :],
            "answer": str(row["gold"] + 1),
        }


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _wikitext(path: Path) -> Iterator[dict]:
    """The 62 articles of the raw test file: each starts at a top-level ' = Title = ' line (the blank line
    before the first title belongs to none), its lines joined with newlines."""
    article: list[str] | None = None
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        if _WIKITEXT_TITLE.match(line):
            if article:
                yield {"page": "\n".join(article)}
            article = []
        if article is not None:
            article.append(line)
    if article:
        yield {"page": "\n".join(article)}


OFFLINE_TASKS = {
    "arc_easy": OfflineTask("arc/arc_easy.yaml", "test", ("arc/arc_easy.jsonl",), _arc, "near-exact"),
    "arc_challenge": OfflineTask("arc/arc_challenge.yaml", "test", ("arc/arc_challenge.jsonl",), _arc, "near-exact"),
    "hellaswag": OfflineTask(
        "hellaswag/hellaswag.yaml",
        "validation",
        ("hellaswag/hellaswag_val_full.txt.bz2",),
        _hellaswag,
        "near-exact (the last context fragment is not capitalised)",
    ),  # fmt: skip
    "piqa": OfflineTask("piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, "exact"),
    "winogrande": OfflineTask(
        "winogrande/default.yaml", "validation", ("winogrande/winogrande.jsonl",), _winogrande, "exact for scoring"
    ),
    "wikitext": OfflineTask("wikitext/wikitext.yaml", "test", (str(WIKITEXT2_TEST),), _wikitext, "exact"),
}


def check_tasks(tasks: dict[str, int | None]) -> None:
    unknown = [task for task in tasks if task not in TASK_METRICS]
    if unknown:
        raise GqaPruneError(f"task {unknown[0]!r} is not one of {', '.join(TASK_METRICS)}")
    bad = {task: limit for task, limit in tasks.items() if limit is not None and limit < 1}
    if bad:
        task, limit = next(iter(bad.items()))
        raise GqaPruneError(f"limit {limit} of task {task!r} must be >= 1 (or null for every item)")


def write_offline_tasks(data_dir: str | os.PathLike, tasks: list[str], folder: Path) -> None:
    """Convert the data files and write one task YAML per task into ``folder`` (an lm-eval include path)."""
    lm_eval = require("lm_eval", "eval", "evaluation")

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    data_dir = Path(data_dir)
    for task in tasks:
        spec = OFFLINE_TASKS[task]
        inputs = [data_dir / name for name in spec.files]
        missing = [str(path) for path in inputs if not path.is_file()]
        if missing:
            raise GqaPruneError(
                f"offline data for task {task!r} not found: {missing[0]} (data_dir laid out like ../shared/data)"
            )
        rows_file = folder / f"{task}.jsonl"
        with open(rows_file, "w") as handle:
            for row in spec.convert(*inputs):
                handle.write(json.dumps(row) + "\n")
        splits = {name: None for name in ("training_split", "validation_split", "test_split")}
        splits[f"{'test' if spec.split == 'test' else 'validation'}_split"] = spec.split
        config = {
            "include": str(lm_eval_tasks / spec.lm_eval_yaml),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(rows_file)}},
            **splits,
        }
        (folder / f"{task}.yaml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML


def run_lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, int | None],
    data_dir: str | os.PathLike | None,
    batch_size: int = 8,
    max_length: int = 2048,
) -> dict:
    """Evaluate every task (each with its own limit) and return lm-eval's results per task, JSON-ready."""
    require("lm_eval", "eval", "evaluation")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    check_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    raw: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gqa-prune-tasks-") as folder:
        if data_dir is not None:
            write_offline_tasks(data_dir, list(tasks), Path(folder))
            manager = TaskManager(include_path=folder, include_defaults=False)
        else:
            manager = TaskManager()
        for task, limit in tasks.items():
            logger.info("lm-eval %s (%s items)", task, "all" if limit is None else limit)
            try:
                result = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False)
            except AssertionError as error:  # lm-eval asserts when an answer alone exceeds max_length
                raise GqaPruneError(
                    f"lm-eval task {task}: an item does not fit max_length {max_length} tokens; "
                    "a model with more positions (and a larger --max-length) is needed for this task"
                ) from error
            raw[task] = json.loads(json.dumps(result, default=handle_non_serializable))
    return raw


def summarize(raw: dict[str, dict], data_dir: str | os.PathLike | None) -> dict[str, dict]:
    """Per task: its metrics with stderr, the items scored, and where the data came from."""
    summary = {}
    for task, result in raw.items():
        metrics = result["results"][task]
        entry = {"items": result["n-samples"][task]["effective"], "limit": result["config"]["limit"]}
        for metric in TASK_METRICS[task]:
            entry[metric] = metrics[f"{metric},none"]
            stderr = metrics.get(f"{metric}_stderr,none")
            entry[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        entry["source"] = (
            f"offline ({OFFLINE_TASKS[task].fidelity} to lm-eval's {task}): {', '.join(OFFLINE_TASKS[task].files)}"
            if data_dir is not None
            else f"lm-eval {task} (hub)"
        )
        summary[task] = entry
    return summary
