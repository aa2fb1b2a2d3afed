"""MkDocs hooks: the reference pages are generated from the code, never written twice.

`docs/reference/cli.md` holds the marker ``<!-- generated: cli -->``, replaced at build time by every
sub-command and option of the argparse parser (``gqa_prune.cli.build_parser``); `docs/reference/config.md`
holds ``<!-- generated: config -->``, replaced by every key of the workflow's config schema
(``workflow/schemas/config.schema.yaml``) with its type, default and description. A benchmarks page may hold
``<!-- generated: headline docs/data/<rows>.json -->``, replaced by the table ``bench/headline.py`` prints from
those rows, so the page shows what the JSON holds; ``<!-- generated: tradeoff docs/data/<grid>.csv COLUMNS -->``
is replaced by those comma-separated columns of a tradeoff CSV the workflow's aggregate rule wrote, formatted as
its tradeoff.md is. tests/test_docs.py builds the
site with ``mkdocs build --strict`` and checks that both pages name every option and key.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
MARKERS = {"<!-- generated: cli -->": "cli", "<!-- generated: config -->": "config"}
HEADLINE = re.compile(r"<!-- generated: headline (\S+) -->")
TRADEOFF = re.compile(r"<!-- generated: tradeoff (\S+) (\S+) -->")


def _cell(text: object) -> str:
    """One Markdown table cell: pipes, asterisks (``|w*g|`` is not emphasis) and angle brackets escaped, newlines
    folded."""
    folded = " ".join(str(text).split())
    return folded.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")


def _value(value: object) -> str:
    """A default as a user writes it: JSON for config values (null, false, lists), str for paths."""
    return str(value) if isinstance(value, Path) else json.dumps(value)


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}` (positional)"
        if action.option_strings and action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`"
        help_text = formatter._expand_help(action) if action.help else ""
        details = []
        if action.choices is not None and not isinstance(action.choices, dict):
            details.append("one of " + ", ".join(f"`{choice}`" for choice in action.choices))
        if action.required:
            details.append("required")
        elif action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0:
            details.append(f"default `{_value(action.default)}`")
        rows.append(f"| {names} | {_cell(help_text)} | {_cell('; '.join(details))} |")
    return rows


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(``gqa-prune plan``, its one-line help, its parser) for every sub-command, nested ones included."""
    found = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, child in action.choices.items():
            nested = _subcommands(child, f"{prefix} {name}")
            found += nested or [(f"{prefix} {name}", helps.get(name, ""), child)]
    return found


def cli_reference() -> str:
    """Markdown for every sub-command: its purpose, then each option with its help, choices and default."""
    from gqa_prune.cli import build_parser

    parser = build_parser()
    lines = ["## Global options", "", "`gqa-prune [GLOBAL OPTIONS] <command> [OPTIONS]`", ""]
    lines += ["| option | meaning | allowed, default |", "|---|---|---|", *_option_rows(parser), ""]
    for name, help_text, child in _subcommands(parser, "gqa-prune"):
        lines += [f"## `{name}`", "", _cell(help_text) + ".", ""]
        if child.description:
            lines += [child.description.strip(), ""]
        lines += ["| option | meaning | allowed, default |", "|---|---|---|", *_option_rows(child), ""]
    return "\n".join(lines)


def _schema_type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if "enum" in node:
        return "one of " + ", ".join(f"`{value}`" for value in node["enum"])
    kind = node.get("type", "any")
    text = " or ".join(kind) if isinstance(kind, list) else kind
    bounds = [f"{word} {node[key]}" for key, word in (
        ("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
        if key in node]  # fmt: skip
    if kind == "array" and isinstance(node.get("items"), dict):
        text += " of " + _schema_type(node["items"], defs)
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _schema_rows(node: dict[str, Any], defs: dict[str, Any], path: str) -> list[str]:
    rows = []
    for key, child in node.get("properties", {}).items():
        key_path = f"{path}.{key}" if path else key
        resolved = defs[child["$ref"].rsplit("/", 1)[1]] if "$ref" in child else child
        description = child.get("description", resolved.get("description", ""))
        default = f"`{_value(child['default'])}`" if "default" in child and child["default"] != {} else ""
        rows.append(f"| `{key_path}` | {_cell(_schema_type(child, defs))} | {_cell(default)} | {_cell(description)} |")
        rows += _schema_rows(resolved, defs, key_path)
    return rows


def config_reference() -> str:
    """Markdown for every key of the workflow config schema: type, default, description."""
    schema = yaml.safe_load(SCHEMA.read_text())
    lines = [_cell(schema.get("description", "")), "", "| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + _schema_rows(schema, schema.get("$defs", {}), ""))


def headline_table(rows_json: str) -> str:
    """The table bench/headline.py prints from ``rows_json`` (a path from the repository root)."""
    spec = importlib.util.spec_from_file_location("headline", REPO / "bench" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table(json.loads((REPO / rows_json).read_text()))


def tradeoff_columns(csv_path: str, columns: str) -> str:
    """The named columns of a workflow tradeoff CSV (a path from the repository root), as tradeoff.md shows them."""
    import pandas as pd

    from gqa_prune.report import to_markdown

    table = pd.read_csv(REPO / csv_path)
    wanted = columns.split(",")
    missing = [column for column in wanted if column not in table]
    if missing:
        raise ValueError(f"{csv_path} has no column {', '.join(missing)}; it has {', '.join(table.columns)}")
    return to_markdown(table[wanted])


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    """Replace the markers by the generated tables."""
    for marker, kind in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, cli_reference() if kind == "cli" else config_reference())
    markdown = TRADEOFF.sub(lambda match: tradeoff_columns(match.group(1), match.group(2)), markdown)
    return HEADLINE.sub(lambda match: headline_table(match.group(1)), markdown)
