"""The manual's code runs: every ``python`` block of docs/reference/python-api.md, in a fresh interpreter (offline)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import calibration_ids, tiny_moe

import gqa_prune
from gqa_prune.expert_plan import ExpertPlan

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_python_api_page_example_runs(tmp_path):
    (block,) = _python_blocks(DOCS / "reference" / "python-api.md")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary, perplexity = done.stdout.strip().splitlines()[-2:]
    assert "'achieved_ratio': 0.2" in summary
    assert 1 < float(perplexity) < 1e4


def test_the_api_prunes_a_mixture_of_experts_as_the_cli_does():
    model = tiny_moe("qwen2_moe")
    blocks = calibration_ids(blocks=4, length=16)
    scores = gqa_prune.score(model, blocks)
    assert "taylor" not in scores.stats and "taylor" in gqa_prune.score(model, blocks, "taylor", curves=False).stats
    with pytest.raises(gqa_prune.errors.GqaPruneError, match="--criterion magnitude: a mixture of experts is scored"):
        gqa_prune.score(model, blocks, "magnitude")
    plan = gqa_prune.plan(scores, ratio=0.5, expert_ratio=0.5, channel_multiple=1)
    assert isinstance(plan, ExpertPlan) and plan.width_ratio == 0.5 and plan.shared_channels is not None
    with pytest.raises(gqa_prune.errors.GqaPruneError, match="an expert plan removes whole experts"):
        gqa_prune.prune(model, plan, calib=blocks)
    pruned = gqa_prune.prune(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    result = gqa_prune.evaluate(pruned, blocks.flatten(), window=16)  # the 4 blocks, each its own window
    with torch.no_grad():
        losses = [pruned(input_ids=block[None], labels=block[None]).loss for block in blocks]
    assert result.windows == 4 and result.perplexity == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)


def test_the_api_names_are_the_documented_ones():
    assert gqa_prune.API == ("score", "plan", "prune", "recover", "evaluate")
    for name in gqa_prune.API:
        assert f"gqa_prune.{name}(" in (DOCS / "reference" / "python-api.md").read_text()
        assert callable(getattr(gqa_prune, name)) and getattr(gqa_prune, name).__doc__
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        gqa_prune.nothing  # noqa: B018


def _build_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=REPO, env=environment, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return site


def test_the_site_builds_strictly_with_every_option_and_config_key(tmp_path):
    site = _build_site(tmp_path)
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    from gqa_prune.cli import build_parser

    sys.path.insert(0, str(DOCS))
    try:
        from hooks import _subcommands
    finally:
        sys.path.remove(str(DOCS))
    commands = _subcommands(build_parser(), "gqa-prune")
    assert len(commands) >= 15
    for name, _, parser in commands:
        assert f'id="{name.replace(" ", "-")}"' in cli_page, name
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert all(option in cli_page for option in action.option_strings), (name, action.option_strings)
    config_page = (site / "reference" / "config" / "index.html").read_text()

    def keys(node: dict, prefix: str = ""):
        for key, child in node.get("properties", {}).items():
            yield f"{prefix}{key}"
            yield from keys(child, f"{prefix}{key}.")

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    all_keys = list(keys(schema))
    assert {"plans.ratios", "reconstruction.ridge", "plans.experts.width_ratio"} <= set(all_keys)
    for key in all_keys:
        assert f"<code>{key}</code>" in config_page, key


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) > 10
    for link in links:
        if "://" not in link:
            assert (REPO / link).exists(), link
    for command in ("make demo", "make test"):
        assert command in text


def _markdown_rows(block: str) -> list[list[str]]:
    lines = [line for line in block.strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _headline_module():
    """bench/headline.py (a script, not a package module), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline", REPO / "bench" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_headline_figure_is_the_one_its_json_holds():
    text = README.read_text()
    match = re.search(r"<!-- headline: (\S+) -->\n(.*?)<!-- /headline -->", text, flags=re.DOTALL)
    assert match, "the README's headline table names its JSON between markers"
    rows = json.loads((REPO / match.group(1)).read_text())
    by_key = {(row["method"], row["ratio"]): row for row in rows}
    dense = by_key[("dense", "–")]
    shown = _markdown_rows(match.group(2))
    assert len(shown) >= 4
    names = {shown_name: prefix for prefix, shown_name in _headline_module().SHOWN}  # what bench/headline.py shows
    for method, ratio, parameters, ppl, multiple, accuracy in shown:
        if method == "dense":
            row = dense
        else:
            base = next(name for name in names if method.startswith(name))
            candidates = [
                row for (name, row_ratio), row in by_key.items()
                if row_ratio == ratio and name.startswith(names[base])
                and name.endswith(method[len(base):]) and (" + LoRA" in name) == (" + LoRA" in method)
            ]  # fmt: skip
            assert len(candidates) == 1, (method, ratio)
            (row,) = candidates
        assert (parameters, ppl, accuracy) == (row["parameters"], row["PPL"], row["mean acc"]), (method, ratio)
        assert multiple == f"{float(row['PPL']) / float(dense['PPL']):.2f}", (method, ratio)
