"""Install the Slurm profile template where ``snakemake --profile slurm`` finds it."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from .atomic import write_text
from .errors import GqaPruneError

DEFAULT_DESTINATION = Path("~/.config/snakemake/slurm")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def slurm_template() -> str:
    return resources.files("gqa_prune").joinpath("profiles/slurm/config.yaml").read_text()


def render_slurm_profile(partition: str, account: str, gpu_model: str | None = None) -> str:
    """The template with partition, account and (optionally) GPU model filled in."""
    for name, value in (("partition", partition), ("account", account), ("gpu model", gpu_model)):
        if value is not None and not _SLURM_NAME.match(value):
            raise GqaPruneError(f"{name} {value!r} must be a plain Slurm name (letters, digits, _ . -)")
    text = slurm_template().replace("@PARTITION@", partition).replace("@ACCOUNT@", account)
    if gpu_model:
        return text.replace("@GPU_MODEL@", gpu_model)
    # no GPU model: drop the config entry, GPU rules then ask for `--gpus=1`
    return re.sub(r"\nconfig:\n  - \"gpu_model=@GPU_MODEL@\"\n", "\n", text)


def install_slurm_profile(
    partition: str,
    account: str,
    gpu_model: str | None = None,
    destination: str | os.PathLike = DEFAULT_DESTINATION,
    force: bool = False,
) -> Path:
    target = Path(destination).expanduser() / "config.yaml"
    if target.exists() and not force:
        raise GqaPruneError(f"{target} exists; pass --force to replace it")
    write_text(target, render_slurm_profile(partition, account, gpu_model), "profile", force=True)
    return target
