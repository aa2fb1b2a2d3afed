"""The README is the user's manual: every table in it must render (a header row, then a separator row, then
rows of the same width), and the commands it tells users to run must exist."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
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


def test_every_readme_table_renders():
    found = tables(README.read_text())
    assert len(found) >= 5
    for start, lines in found:
        assert len(lines) >= 3, f"README.md:{start}: a table needs a header, a separator and rows"
        assert not SEPARATOR.match(lines[0]), f"README.md:{start}: the table has no header row"
        assert SEPARATOR.match(lines[1]), f"README.md:{start + 1}: the second line is not a separator"
        width = _cells(lines[0])
        for offset, line in enumerate(lines[1:], start=1):
            assert _cells(line) == width, f"README.md:{start + offset}: {_cells(line)} cells, header has {width}"
