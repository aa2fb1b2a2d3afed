"""Atomic writes: an interrupted stage leaves nothing that looks finished."""

from __future__ import annotations

import os

import pytest

from gqa_prune.atomic import atomic_dir, atomic_file


def test_failed_block_leaves_no_target_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "model") as temporary:
        (temporary / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "plan.json") as temporary:
        temporary.write_text("{")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_replaced_whole_with_plain_permissions(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "gqa_prune.json").write_text("{}")  # an earlier gqa-prune output
    (tmp_path / "model" / "old.bin").write_bytes(b"old")
    with atomic_dir(tmp_path / "model") as temporary:
        (temporary / "new.safetensors").write_bytes(b"new")
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["new.safetensors"]
    with atomic_file(tmp_path / "out.json") as temporary:
        temporary.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "out.json"]


@pytest.mark.parametrize(
    ("make", "writer", "message"),
    [
        (lambda path: path.mkdir(), atomic_file, "is an existing directory; a file output never replaces a directory"),
        (lambda path: path.write_text("x"), atomic_dir, "is an existing file; a folder output never replaces a file"),
        (
            lambda path: (path.mkdir(), (path / "notes.txt").write_text("mine")),
            atomic_dir,
            "is an existing folder that gqa-prune did not write; refusing to replace it",
        ),
    ],
)
def test_outputs_never_replace_what_they_must_not(tmp_path, make, writer, message):
    from gqa_prune.errors import GqaPruneError

    target = tmp_path / "out"
    make(target)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    with pytest.raises(GqaPruneError, match=message), writer(target):
        pass
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.tmp-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".model.tmp-{os.getpid()}-live"  # a running process's temporary stays
    mine.mkdir()
    other = tmp_path / f".other.tmp-{int(dead.stdout)}-abc"  # another output's temporary stays
    other.mkdir()
    with atomic_dir(tmp_path / "model") as temporary:
        (temporary / "gqa_prune.json").write_text("{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model", mine.name, other.name])
