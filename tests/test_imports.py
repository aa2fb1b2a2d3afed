"""The package's import graph runs one way: no circles, and the pure core never reaches up to I/O.

The graph is read from the source (every ``from . import`` / ``from .x import``, at module level or inside
functions), so a lazy import that hides a circle from Python's import machinery is still caught here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gqa_prune"
# arch -> units -> scores -> planning -> surgery, and what computes scores and refits: no files, no CLI, no workflow
CORE = {"arch", "units", "scores", "allocation", "planning", "surgery", "passes", "criteria", "importance",
        "reconstruct", "moe", "expert_scores", "expert_plan", "expert_surgery", "expert_importance"}  # fmt: skip
ABOVE_CORE = {"cli", "sources", "data", "quantize", "gptq_format", "recovery", "report", "evaluation", "checkpoint",
              "plotting", "profile", "efficiency", "perplexity", "export", "api"}  # fmt: skip


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module_name(file): file for file in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module (relative to gqa_prune, '' for the package) -> the package modules it imports."""
    modules = _files()
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        package = [part for part in package if part]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            targets.add(target)
            targets.update(f"{target}.{alias.name}".lstrip(".") for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "planning" in graph["surgery"] and "units.base" in graph["units.gqa_group"]
    assert "gptq_format" in graph["sources"] and "sources" in graph["quantize"]


def test_there_is_no_import_circle():
    graph = import_graph()
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in finished:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        finished.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_core_never_imports_io_the_cli_or_the_workflow():
    graph, files = import_graph(), _files()
    for module, targets in graph.items():
        if _top(module) in CORE:
            upward = sorted(target for target in targets if _top(target) in ABOVE_CORE)
            assert not upward, f"{module} imports {upward}"
            assert "snakemake" not in files[module].read_text()


def test_plans_do_not_import_the_scorer():
    graph = import_graph()
    assert not {"importance", "criteria", "passes"} & {_top(target) for target in graph["planning"]}
