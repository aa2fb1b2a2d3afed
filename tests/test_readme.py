"""Every table of the README and of the manual's pages must render: a header row, then a separator row, then
rows of the same width (MkDocs renders a broken table as text without a warning, so --strict cannot see it)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every block of consecutive table lines outside code fences."""
    found, block, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            if not block:
                start = number
            block.append(line)
        elif block:
            found.append((start, block))
            block = []
    return found


def test_the_table_finder_sees_a_missing_header():
    broken = "text\n\n|---|---:|\n| a | 1 |\n"
    ((_, lines),) = tables(broken)
    assert SEPARATOR.match(lines[0])  # the case test_every_readme_table_renders refuses


def test_every_table_of_the_readme_and_the_manual_renders():
    count = 0
    for page in PAGES:
        name = page.relative_to(REPO)
        for start, lines in tables(page.read_text()):
            count += 1
            assert len(lines) >= 3, f"{name}:{start}: a table needs a header, a separator and rows"
            assert not SEPARATOR.match(lines[0]), f"{name}:{start}: the table has no header row"
            assert SEPARATOR.match(lines[1]), f"{name}:{start + 1}: the second line is not a separator"
            width = _cells(lines[0])
            for offset, line in enumerate(lines[1:], start=1):
                assert _cells(line) == width, f"{name}:{start + offset}: {_cells(line)} cells, header has {width}"
    assert count >= 20
