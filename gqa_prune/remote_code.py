"""Whether code shipped in a model folder may run: never implicitly.

gqa-prune's own modeling file (byte-identical to the package's) needs no trust: ``import gqa_prune``
registers its classes. Any other ``auto_map`` code is refused in one line unless the user passed
``--trust-remote-code`` (``allow_remote_code(True)``).
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

from .errors import GqaPruneError

logger = logging.getLogger(__name__)

_REMOTE_CODE = {"allowed": False}  # set once per process by the CLI's --trust-remote-code


def allow_remote_code(allowed: bool) -> None:
    """Whether code shipped in a model folder (other than gqa-prune's own modeling file) may run."""
    _REMOTE_CODE["allowed"] = bool(allowed)


def remote_code_allowed() -> bool:
    """Whether the user passed --trust-remote-code in this process."""
    return _REMOTE_CODE["allowed"]


def _auto_map_modules(folder: Path) -> set[str]:
    """Modules that config.json / tokenizer_config.json point their auto_map at ("repo--module" kept whole)."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise GqaPruneError(f"{file}: not a valid JSON object ({error})") from error
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if isinstance(reference, str):
                    modules.add(reference.rsplit(".", 1)[0])
    return modules


def trust_remote_code(path: str | os.PathLike) -> bool:
    """Whether loading this folder must run code from it.

    False when it has none, or only gqa-prune's own modeling file (byte-identical to the package's: the
    classes registered by ``import gqa_prune`` load it instead). A folder with any other code is refused in
    one line unless ``allow_remote_code(True)`` (the CLI's ``--trust-remote-code``) was called.
    """
    folder = Path(path)
    shipped = resources.files("gqa_prune").joinpath("modeling_gqa_prune.py").read_bytes()
    foreign = sorted(
        module
        for module in _auto_map_modules(folder)
        if "--" in module
        or not (folder / f"{module}.py").is_file()
        or (folder / f"{module}.py").read_bytes() != shipped
    )
    if not foreign:
        return False
    if _REMOTE_CODE["allowed"]:
        logger.warning("running code from %s (%s): --trust-remote-code was given", folder, ", ".join(foreign))
        return True
    raise GqaPruneError(
        f"model folder {str(folder)!r} ships its own code ({', '.join(foreign)}) that loading would run; "
        "gqa-prune runs no code from a model folder unless you pass --trust-remote-code"
    )
