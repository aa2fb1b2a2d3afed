"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

An interrupted stage therefore leaves at most a ``.tmp-*`` sibling, never something that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_mode(is_dir: bool) -> int:
    """Permissions a plain open()/mkdir() would give (tempfile uses private 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _temporary_sibling(target: Path, is_dir: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(handle)
        path = Path(name)
    path.chmod(_default_mode(is_dir))
    return path


def _replace(temporary: Path, target: Path) -> None:
    """Move ``temporary`` onto ``target``; an existing target is removed only after the new one is whole."""
    if target.is_dir() and not target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(temporary, target)
        shutil.rmtree(trash)
    else:
        os.replace(temporary, target)


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, is_dir: bool) -> Iterator[Path]:
    target = Path(target)
    temporary = _temporary_sibling(target, is_dir=is_dir)
    try:
        yield temporary
        _replace(temporary, target)
    finally:
        if is_dir and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        elif not is_dir:
            temporary.unlink(missing_ok=True)


def atomic_dir(target: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """A temporary directory that becomes ``target`` when the block finishes without error."""
    return _atomic(target, is_dir=True)


def atomic_file(target: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """A temporary file path that becomes ``target`` when the block finishes without error."""
    return _atomic(target, is_dir=False)


def write_json(target: str | os.PathLike, data: object) -> None:
    """Write JSON atomically (sorted keys, trailing newline) so it is stable under version control."""
    with atomic_file(target) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_file(target) as temporary:
        temporary.write_text(text)
