"""Atomic writes: an interrupted stage leaves nothing that looks finished; an output replaces only its own kind."""

from __future__ import annotations

import json
import os

import pytest

from gqa_prune.atomic import FOLDER_MARKER, MARKER, atomic_dir, atomic_file, marked, write_json, written_by
from gqa_prune.errors import GqaPruneError


def test_failed_block_leaves_no_target_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "model", "prune") as temporary:
        (temporary / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "plan.json", "plan") as temporary:
        temporary.write_text("{")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_replaced_whole_with_plain_permissions(tmp_path):
    with atomic_dir(tmp_path / "model", "prune") as temporary:
        (temporary / "old.bin").write_bytes(b"old")
    with atomic_dir(tmp_path / "model", "prune") as temporary:
        (temporary / "new.safetensors").write_bytes(b"new")
    assert sorted(path.name for path in (tmp_path / "model").iterdir()) == [FOLDER_MARKER, "new.safetensors"]
    write_json(tmp_path / "out.json", {"a": 1}, "ppl")
    write_json(tmp_path / "out.json", {"a": 2}, "ppl")
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 2, MARKER: "ppl"}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "out.json"]


def _our_folder(path, kind):
    with atomic_dir(path, kind) as temporary:
        (temporary / "gqa_prune.json").write_text("{}")


@pytest.mark.parametrize(
    ("make", "writer", "message"),
    [
        (lambda path: path.mkdir(), lambda t: atomic_file(t, "ppl"), "is an existing directory; a file output never"),
        (lambda path: path.write_text("x"), lambda t: atomic_dir(t, "prune"), "is an existing file; a folder output"),
        (
            lambda path: (path.mkdir(), (path / "notes.txt").write_text("mine")),
            lambda t: atomic_dir(t, "prune"),
            "is an existing folder that gqa-prune did not write; refusing to replace it",
        ),
        (
            lambda path: (path.mkdir(), (path / "gqa_prune.json").write_text("{}")),
            lambda t: atomic_dir(t, "prune"),
            "is an existing folder that gqa-prune wrote before outputs were marked",
        ),
        (
            lambda path: _our_folder(path, "prune"),
            lambda t: atomic_dir(t, "importance"),
            "holds the output of `gqa-prune prune`; `gqa-prune importance` replaces only its own outputs",
        ),
        (
            lambda path: write_json(path, {"ppl": 1.0}, "ppl"),
            lambda t: atomic_file(t, "evaluate"),
            "holds the output of `gqa-prune ppl`; `gqa-prune evaluate` replaces only its own outputs",
        ),
        (
            lambda path: path.write_text('{"ppl": 1.0}'),
            lambda t: atomic_file(t, "ppl"),
            "is an existing file that gqa-prune did not write",
        ),
    ],
)
def test_outputs_never_replace_what_they_must_not(tmp_path, make, writer, message):
    target = tmp_path / "out"
    make(target)
    before = {str(path): path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    with pytest.raises(GqaPruneError, match=message), writer(target):
        pass
    assert {str(path): path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before


def test_a_file_writer_that_forgets_its_marker_fails_loudly(tmp_path):
    with pytest.raises(RuntimeError, match="did not mark it"), atomic_file(tmp_path / "x.json", "ppl") as temporary:
        temporary.write_text("{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".png"])
def test_markers_read_back_from_every_format(tmp_path, suffix):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"out{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(marked({"x": 1}, "ppl")))
    elif suffix == ".safetensors":
        save_file({"x": torch.zeros(2)}, str(path), metadata={"gqa_prune": json.dumps(marked({}, "ppl"))})
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = plt.figure()
        figure.savefig(path, format="png", metadata=marked({}, "ppl"))
        plt.close(figure)
    assert written_by(path) == "ppl"
    path.write_bytes(path.read_bytes().replace(b"gqa_prune.output", b"gqa_prune.outpux"))
    assert written_by(path) is None


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
    with atomic_dir(tmp_path / "model", "prune") as temporary:
        (temporary / "gqa_prune.json").write_text("{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model", mine.name, other.name])
