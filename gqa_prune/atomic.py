"""Atomic outputs: write into a temporary sibling, rename into place only when complete.

An interrupted stage therefore leaves at most a ``.<name>.tmp-<pid>-*`` sibling, never something that looks
finished; it is removed on every exit the process sees (exceptions, Ctrl-C, SIGTERM through the CLI's
handler), and a later run of the same output removes those a killed process left behind.

Every output carries one marker naming the sub-command that wrote it (``MARKER``): a hidden file in a folder,
a key in a JSON file, in a calibration file's metadata, in a PNG's text chunks and in a GGUF's metadata; the
tradeoff table's .csv/.md/.html take theirs from the ``.sources.json`` beside them. An existing path is
replaced only by the sub-command that wrote it (an empty folder is free to take); anything else (another
sub-command's output, a user's file or folder, an input of the same command) is refused in one line before
any work, and once more just before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import GqaPruneError

MARKER = "gqa_prune.output"  # value: the sub-command that wrote the output (e.g. "prune", "ppl", "calib")
FOLDER_MARKER = ".gqa_prune_output.json"  # a folder output's marker file: {"gqa_prune.output": "<command>"}
COMPANION_SUFFIX = ".sources.json"  # marks the tradeoff table's .csv/.md/.html beside it (formats without a slot)
_COMPANION_MARKED = (".csv", ".md", ".html")
_LEGACY_MARKERS = ("gqa_prune.json", "scores.json", "groups.safetensors")  # folders of gqa-prune before the marker
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ markers
def marked(data: Mapping, kind: str) -> dict:
    """``data`` with the marker of sub-command ``kind`` (JSON records, safetensors metadata, PNG text)."""
    return {**data, MARKER: kind}


def _kind_in(record: object) -> str | None:
    value = record.get(MARKER) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its header alone."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:
            return {}
        header = json.loads(handle.read(length))
    return header.get("__metadata__") or {} if isinstance(header, dict) else {}


def _png_text(path: Path) -> dict[str, str]:
    """A PNG's tEXt chunks (matplotlib writes ``savefig(metadata=...)`` there)."""
    texts = {}
    with open(path, "rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return texts
        while len(header := handle.read(8)) == 8:
            length, chunk = struct.unpack(">I4s", header)
            if chunk == b"IEND":
                break
            if chunk != b"tEXt":
                handle.seek(length + 4, os.SEEK_CUR)
                continue
            key, _, value = handle.read(length).partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
            handle.seek(4, os.SEEK_CUR)
    return texts


def written_by(path: str | os.PathLike) -> str | None:
    """The sub-command whose output ``path`` is (its marker), or None when gqa-prune did not write it."""
    path = Path(path)
    try:
        if path.is_dir():
            return _kind_in(json.loads((path / FOLDER_MARKER).read_text()))
        if path.suffix in _COMPANION_MARKED:
            companion = path.with_suffix(COMPANION_SUFFIX)
            return written_by(companion) if companion.is_file() else None
        with open(path, "rb") as handle:  # by content, not by name: `--out result` is as much ours as result.json
            head = handle.read(9)
        if head.startswith(_PNG_SIGNATURE):
            return _png_text(path).get(MARKER)
        if head.startswith(b"GGUF"):
            import gguf

            field = gguf.GGUFReader(str(path)).fields.get(MARKER)
            return str(field.contents()) if field is not None else None
        if head.lstrip().startswith(b"{"):
            return _kind_in(json.loads(path.read_text()))
        if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
            return _kind_in(json.loads(_safetensors_metadata(path).get("gqa_prune", "{}")))
    except (OSError, ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError, struct.error):
        return None
    return None


# ------------------------------------------------------------------------------------------ checks
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


def _check_replaceable(target: Path, is_dir: bool, kind: str) -> None:
    """An existing path is replaced only if sub-command ``kind`` wrote it (or it is an empty folder)."""
    if is_dir and target.is_dir() and not any(target.iterdir()):
        return
    writer = written_by(target)
    if writer == kind:
        return
    what = "folder" if target.is_dir() else "file"
    if writer is not None:
        raise GqaPruneError(
            f"output {str(target)!r} holds the output of `gqa-prune {writer}`; `gqa-prune {kind}` replaces only "
            f"its own outputs (choose another path or remove it yourself)"
        )
    earlier = is_dir and any((target / marker).is_file() for marker in _LEGACY_MARKERS)
    raise GqaPruneError(
        f"output {str(target)!r} is an existing {what} that gqa-prune "
        + ("wrote before outputs were marked; " if earlier else "did not write; ")
        + "refusing to replace it (choose another path or remove it yourself)"
    )


def check_output(target: str | os.PathLike, is_dir: bool, kind: str) -> Path:
    """Refuse an output path that would replace something it must not (one line naming the path)."""
    target = Path(target)
    if is_dir and (target.is_file() or target.is_symlink()):
        raise GqaPruneError(f"output {str(target)!r} is an existing file; a folder output never replaces a file")
    if not is_dir and target.is_dir():
        raise GqaPruneError(
            f"output {str(target)!r} is an existing directory; a file output never replaces a directory"
        )
    if target.exists():
        _check_replaceable(target, is_dir, kind)
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise GqaPruneError(f"output {str(target)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK):
                raise GqaPruneError(f"output {str(target)!r} cannot be created: {str(parent)!r} is not writable")
            break
    return target


def check_not_input(target: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> None:
    """Refuse an output that is, or contains, one of the command's inputs (``inputs``: option -> path)."""
    resolved = Path(target).expanduser().resolve()
    for option, path in inputs.items():
        source = Path(path).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            relation = "is" if source == resolved else "contains"
            raise GqaPruneError(
                f"output {str(target)!r} {relation} the input {option} {str(path)!r}; write the output elsewhere"
            )


# ------------------------------------------------------------------------------------------ disk space
def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (safetensors and tokenizers raise their own types with the OS message)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


# ------------------------------------------------------------------------------------------ writing
def _temporary_sibling(target: Path, is_dir: bool) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GqaPruneError(f"output {str(target)!r} cannot be created: {error.strerror}") from error
    remove_stale_siblings(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:  # the same suffix as the target: the marker check reads the file by its format
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
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


def _mark(temporary: Path, is_dir: bool, kind: str) -> None:
    """Folders get the marker file; files (but the table's, marked by their companion) carry it in their format."""
    if is_dir:
        (temporary / FOLDER_MARKER).write_text(json.dumps(marked({}, kind), sort_keys=True) + "\n")
    elif temporary.suffix not in _COMPANION_MARKED and written_by(temporary) != kind:
        raise RuntimeError(f"{temporary.name}: the writer of a {kind} output did not mark it ({MARKER})")


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, is_dir: bool, kind: str, force: bool = False) -> Iterator[Path]:
    target = Path(target) if force else check_output(target, is_dir, kind)
    temporary = _temporary_sibling(target, is_dir=is_dir)
    try:
        try:
            yield temporary
            if not force:
                _mark(temporary, is_dir, kind)
        except BaseException as error:
            if _is_disk_full(error):
                raise GqaPruneError(
                    f"no space left on the device while writing {str(target)!r}: it needs more than the "
                    f"{_mib(_size_of(temporary))} written before the disk filled; free space and run again"
                ) from error
            raise
        if not force:
            check_output(target, is_dir, kind)  # nothing appeared at the target meanwhile that must not be replaced
        _replace(temporary, target)
    finally:
        if is_dir and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        elif not is_dir:
            temporary.unlink(missing_ok=True)


def atomic_dir(target: str | os.PathLike, kind: str) -> contextlib.AbstractContextManager[Path]:
    """A temporary directory that becomes ``target`` (marked as ``kind``'s output) when the block succeeds."""
    return _atomic(target, is_dir=True, kind=kind)


def atomic_file(target: str | os.PathLike, kind: str, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """A temporary file path that becomes ``target`` when the block succeeds; the writer marks it as ``kind``'s
    (``marked``) where its format holds a marker. ``force``: replace whatever is there (the user said so)."""
    return _atomic(target, is_dir=False, kind=kind, force=force)


def write_json(target: str | os.PathLike, data: Mapping, kind: str) -> None:
    """Write JSON atomically (sorted keys, trailing newline, the marker of ``kind``), stable under version control."""
    with atomic_file(target, kind) as temporary:
        temporary.write_text(json.dumps(marked(data, kind), indent=2, sort_keys=True) + "\n")


def write_text(target: str | os.PathLike, text: str, kind: str, force: bool = False) -> None:
    """Write text atomically; a JSON target must already hold the marker of ``kind`` (see ``marked``)."""
    with atomic_file(target, kind, force=force) as temporary:
        temporary.write_text(text)
