"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

An interrupted stage therefore leaves at most a ``.<name>.tmp-<pid>-*`` sibling, never something that looks
finished; it is removed on every exit the process sees (exceptions, Ctrl-C, SIGTERM through the CLI's
handler), and a later run of the same output removes those a killed process left behind. An output never
replaces what it should not: a file output never replaces a directory, a directory output never a file,
and an existing directory only when it is empty or an earlier gqa-prune output of the same kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import GqaPruneError

# files that mark a directory as an earlier gqa-prune output (model folders, importance folders)
OUTPUT_MARKERS = ("gqa_prune.json", "scores.json", "groups.safetensors")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def _default_mode(is_dir: bool) -> int:
    """Permissions a plain open()/mkdir() would give (tempfile uses private 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` left by processes that no longer run; returns what went."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = _SIBLING.match(path.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def check_output(target: str | os.PathLike, is_dir: bool) -> Path:
    """Refuse an output path that would replace something it must not (one line naming the path)."""
    target = Path(target)
    if is_dir and (target.is_file() or target.is_symlink()):
        raise GqaPruneError(f"output {str(target)!r} is an existing file; a folder output never replaces a file")
    if not is_dir and target.is_dir():
        raise GqaPruneError(
            f"output {str(target)!r} is an existing directory; a file output never replaces a directory"
        )
    if is_dir and target.is_dir() and any(target.iterdir()):
        if not any((target / marker).is_file() for marker in OUTPUT_MARKERS):
            raise GqaPruneError(
                f"output {str(target)!r} is an existing folder that gqa-prune did not write; "
                "refusing to replace it (choose another path or remove it yourself)"
            )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise GqaPruneError(f"output {str(target)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK):
                raise GqaPruneError(f"output {str(target)!r} cannot be created: {str(parent)!r} is not writable")
            break
    return target


def _temporary_sibling(target: Path, is_dir: bool) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GqaPruneError(f"output {str(target)!r} cannot be created: {error.strerror}") from error
    remove_stale_siblings(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
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
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(temporary, target)
        shutil.rmtree(trash)
    else:
        os.replace(temporary, target)


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, is_dir: bool) -> Iterator[Path]:
    target = check_output(target, is_dir)
    temporary = _temporary_sibling(target, is_dir=is_dir)
    try:
        yield temporary
        check_output(target, is_dir)  # nothing appeared at the target meanwhile that must not be replaced
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
