"""lm-eval on offline copies of its tasks: faithful conversions, deterministic scores, clear refusals."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from helpers import tiny_model

from gqa_prune.errors import GqaPruneError
from gqa_prune.evaluation import OFFLINE_TASKS, check_tasks, run_lm_eval, summarize

ALL_TASKS = {"arc_easy": 8, "arc_challenge": 4, "hellaswag": 4, "piqa": 6, "winogrande": 6, "wikitext": 1}


def _lm_eval_module(relative: str):
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(task: str, data_dir: Path) -> list[dict]:
    spec = OFFLINE_TASKS[task]
    return list(spec.convert(*(data_dir / name for name in spec.files)))


def test_offline_rows_have_the_expected_counts(data_dir):
    counts = {task: len(_rows(task, data_dir)) for task in OFFLINE_TASKS}
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838,
                      "winogrande": 1267, "wikitext": 62}  # fmt: skip


def test_winogrande_rows_make_lm_evals_scored_strings_equal_to_the_file(data_dir):
    winogrande = _lm_eval_module("winogrande/preprocess_winogrande.py")
    import json

    originals = [json.loads(line) for line in (data_dir / "winogrande/winogrande.jsonl").read_text().splitlines()]
    for row, original in zip(_rows("winogrande", data_dir), originals, strict=True):
        assert winogrande.doc_to_choice(row) == original["context_options"]
        assert winogrande.doc_to_target(row) == original["continuation"]
        assert winogrande.doc_to_text(row) == original["gold"]


def test_arc_and_hellaswag_rows_render_lm_evals_prompts(data_dir):
    arc = _rows("arc_easy", data_dir)[0]
    assert arc["choices"]["label"][["A", "B", "C", "D"].index(arc["answerKey"])] == arc["answerKey"]
    assert not arc["question"].startswith("Question:")
    hellaswag = _lm_eval_module("hellaswag/utils.py")
    first = _rows("hellaswag", data_dir)[0]
    processed = hellaswag.preprocess(
        first["activity_label"] + ": " + first["ctx_a"] + " " + first["ctx_b"].capitalize()
    )
    assert processed == "Roof shingle removal: A man is sitting on a roof. he" and first["label"] == "3"


def test_wikitext_articles_start_at_top_level_titles(data_dir):
    pages = [row["page"] for row in _rows("wikitext", data_dir)]
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert all(page.split("\n")[0].startswith(" = ") and not page.startswith(" = = ") for page in pages)
    raw = (data_dir / "wikitext-2-raw/wiki.test.raw").read_text()
    assert sum(len(page) + 1 for page in pages) == len(raw) - 2  # every line but the leading blank one


def test_offline_tasks_score_a_tiny_model_identically_twice(data_dir, tiny_tokenizer):
    model = tiny_model("llama", 3, vocab_size=len(tiny_tokenizer))
    first, second = (summarize(run_lm_eval(model, tiny_tokenizer, ALL_TASKS, data_dir, batch_size=4, max_length=512),
                               data_dir) for _ in range(2))  # fmt: skip
    assert first == second
    assert set(first) == set(ALL_TASKS)
    for task, limit in ALL_TASKS.items():
        assert first[task]["items"] == limit and "offline" in first[task]["source"]
    assert first["wikitext"]["word_perplexity"] > 1 and 0 <= first["piqa"]["acc_norm"] <= 1


def test_bad_task_settings_are_refused(data_dir, tmp_path):
    with pytest.raises(GqaPruneError, match="task 'mmlu' is not one of arc_easy, arc_challenge, hellaswag, piqa"):
        check_tasks({"mmlu": 10})
    with pytest.raises(GqaPruneError, match="limit 0 of task 'piqa' must be >= 1"):
        check_tasks({"piqa": 0})
    from gqa_prune.evaluation import write_offline_tasks

    with pytest.raises(GqaPruneError, match="offline data for task 'piqa' not found"):
        write_offline_tasks(tmp_path, ["piqa"], tmp_path)
    assert os.listdir(tmp_path) == []


def test_own_perplexity_and_lm_eval_word_perplexity_are_reproducible(data_dir, tiny_tokenizer):
    from gqa_prune.data import wikitext2_test_text
    from gqa_prune.perplexity import perplexity

    model = tiny_model("qwen2", 3, vocab_size=len(tiny_tokenizer))
    tokens = tiny_tokenizer(wikitext2_test_text(data_dir), return_tensors="pt").input_ids[0]
    own = [perplexity(model, tokens, 64, "wikitext", max_tokens=1024).perplexity for _ in range(2)]
    word = [
        summarize(run_lm_eval(model, tiny_tokenizer, {"wikitext": 1}, data_dir, max_length=256), data_dir)["wikitext"]
        for _ in range(2)
    ]
    assert own[0] == own[1] and word[0]["word_perplexity"] == word[1]["word_perplexity"]
