"""The Slurm profile installer: `snakemake --profile slurm` reads what it writes."""

from __future__ import annotations

import pytest
import yaml

from gqa_prune.errors import GqaPruneError
from gqa_prune.profile import install_slurm_profile, render_slurm_profile


def test_profile_has_partition_account_status_command_and_gpu_model(tmp_path):
    target = install_slurm_profile("gpu", "proj-42", "a100", destination=tmp_path / "slurm")
    profile = yaml.safe_load(target.read_text())
    assert target == tmp_path / "slurm" / "config.yaml"
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    assert profile["default-resources"]["slurm_partition"] == "gpu"
    assert profile["default-resources"]["slurm_account"] == "proj-42"
    assert profile["config"] == ["gpu_model=a100"]


def test_without_gpu_model_no_config_entry_and_no_placeholders_left():
    text = render_slurm_profile("batch", "acct")
    assert "@" not in text and "config" not in yaml.safe_load(text)


def test_bad_names_and_existing_profiles_are_refused(tmp_path):
    with pytest.raises(GqaPruneError, match="partition 'gpu; rm' must be a plain Slurm name"):
        render_slurm_profile("gpu; rm", "acct")
    install_slurm_profile("gpu", "acct", destination=tmp_path)
    with pytest.raises(GqaPruneError, match="exists; pass --force to replace it"):
        install_slurm_profile("gpu", "acct", destination=tmp_path)
    install_slurm_profile("cpu", "acct", destination=tmp_path, force=True)
    assert 'slurm_partition: "cpu"' in (tmp_path / "config.yaml").read_text()
