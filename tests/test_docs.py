"""The manual's code runs: every ``python`` block of docs/python-api.md, in a fresh interpreter (offline)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import calibration_ids, tiny_moe

import gqa_prune
from gqa_prune.expert_plan import ExpertPlan

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_python_api_page_example_runs(tmp_path):
    (block,) = _python_blocks(DOCS / "python-api.md")
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
        assert f"gqa_prune.{name}(" in (DOCS / "python-api.md").read_text()
        assert callable(getattr(gqa_prune, name)) and getattr(gqa_prune, name).__doc__
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        gqa_prune.nothing  # noqa: B018
