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
