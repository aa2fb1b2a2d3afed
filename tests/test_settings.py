"""One source for each default: the library's settings dataclasses. The CLI reads its defaults from them and
the workflow's config schema must state the same values."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from gqa_prune.choices import DEFAULT_MODE, EXPERT_ALLOCATIONS, EXPERT_CRITERIA
from gqa_prune.cli import build_parser
from gqa_prune.settings import (
    CURVE_TOKENS,
    IMPORTANCE_BATCH_SIZE,
    CalibrationSettings,
    ExpertPlanSettings,
    PlanSettings,
    ReconstructionSettings,
    RecoverySettings,
    default_of,
)

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
# schema section -> (dataclass, {schema key: field name}); keys absent from the schema are CLI/library only
SECTIONS = {
    "calibration": (CalibrationSettings, {name: name for name in ("n_samples", "seq_len", "seed")}),
    "plans": (PlanSettings, {"alpha": "alpha", "min_rate": "min_rate", "max_rate": "max_rate",
                             "channel_multiple": "channel_multiple", "layer_criterion": "layer_criterion"}),
    "reconstruction": (ReconstructionSettings, {"ridge": "ridge", "target": "target", "select": "select",
                                                  "batch_size": "batch_size"}),
    "recovery": (RecoverySettings, {name: name for name in ("rank", "alpha", "dropout", "lr", "steps", "batch_size",
                                                           "warmup_steps", "temperature", "seed",
                                                           "gradient_checkpointing", "router")}),
}  # fmt: skip
COMMANDS = {"calibration": "calib", "plans": "plan", "reconstruction": "prune", "recovery": "recover"}
CLI_NAMES = {("prune", "target"): "reconstruct_target"}


def _cli_defaults(command: str) -> dict:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return {action.dest: action.default for action in sub._actions}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_and_cli_defaults_are_the_dataclass_defaults(section):
    settings, keys = SECTIONS[section]
    schema = SCHEMA["properties"][section]["properties"]
    cli = _cli_defaults(COMMANDS[section])
    for key, name in keys.items():
        expected = default_of(settings, name)
        assert schema[key]["default"] == expected, f"schema {section}.{key}"
        dest = CLI_NAMES.get((COMMANDS[section], name), name)
        if dest in cli and not isinstance(expected, bool):
            assert cli[dest] == expected, f"gqa-prune {COMMANDS[section]} --{dest.replace('_', '-')}"


def test_expert_plan_defaults_are_the_same_everywhere():
    schema = SCHEMA["properties"]["plans"]["properties"]["experts"]["properties"]
    for key in ("allocation", "channel_ratio", "seed"):
        assert schema[key]["default"] == default_of(ExpertPlanSettings, key), f"schema plans.experts.{key}"
    assert schema["criteria"]["default"] == [default_of(ExpertPlanSettings, "criterion")]
    assert schema["criteria"]["items"]["enum"] == list(EXPERT_CRITERIA)
    assert schema["allocation"]["enum"] == list(EXPERT_ALLOCATIONS)
    cli = _cli_defaults("plan")
    assert cli["expert_criterion"] == default_of(ExpertPlanSettings, "criterion")
    assert cli["experts"] == default_of(ExpertPlanSettings, "allocation")
    assert cli["expert_channel_ratio"] == default_of(ExpertPlanSettings, "channel_ratio")
    assert default_of(ExpertPlanSettings, "channel_multiple") == default_of(PlanSettings, "channel_multiple")


def test_every_mapped_name_is_a_field():
    for settings, keys in SECTIONS.values():
        assert set(keys.values()) <= {item.name for item in fields(settings)}


def test_the_default_mode_is_the_same_everywhere():
    assert PlanSettings(ratio=0.2).mode == DEFAULT_MODE
    assert PlanSettings(attn_ratio=0.0, mlp_ratio=0.2).mode == "width"  # a hand split is a width plan
    assert SCHEMA["properties"]["plans"]["properties"]["modes"]["default"] == [DEFAULT_MODE]
    assert _cli_defaults("plan")["mode"] is None  # resolved by PlanSettings


def test_importance_defaults_are_the_same_everywhere():
    import inspect

    from gqa_prune.importance import score

    schema = SCHEMA["properties"]["importance"]["properties"]
    assert schema["batch_size"]["default"] == IMPORTANCE_BATCH_SIZE == _cli_defaults("importance")["batch_size"]
    assert inspect.signature(score).parameters["batch_size"].default == IMPORTANCE_BATCH_SIZE
    assert f"{CURVE_TOKENS:,}" in schema["curve_blocks"]["description"]
