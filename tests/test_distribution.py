"""The distribution name (``dent-defense``: PyPI's ``dent`` is Docker ENTer) and the warning when both are installed."""

import re
import warnings
from pathlib import Path

import pytest

from dent.distribution import (CONFLICTING_DISTRIBUTION, DISTRIBUTION, OWN_SUMMARY_START,
                               ConflictingInstallationWarning, conflicting_installation,
                               warn_if_conflicting_installation)
from dent.provenance import library_versions

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def _fake_installed_distribution(site: Path, name: str, version: str, summary: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {summary}\n")


def test_the_project_is_distributed_under_the_free_name_with_the_summary_the_check_knows():
    assert re.search(rf'^name = "{DISTRIBUTION}"$', PYPROJECT, re.M)
    assert re.search(rf'^description = "{OWN_SUMMARY_START}', PYPROJECT, re.M)
    assert library_versions()["dent"] != "not installed"  # looked up by the distribution's name


def test_this_environment_has_no_conflicting_installation():
    assert conflicting_installation() is None


def test_docker_enter_installed_beside_dent_is_named_in_a_warning(tmp_path, monkeypatch):
    _fake_installed_distribution(tmp_path, CONFLICTING_DISTRIBUTION, "1.0.3",
                                 "Enter interactive shells in Docker containers and manage persistent containers")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert conflicting_installation() == "1.0.3"
    with pytest.warns(ConflictingInstallationWarning) as caught:
        warn_if_conflicting_installation()
    message = str(caught[0].message)
    assert "'dent' 1.0.3" in message and "Docker ENTer" in message and DISTRIBUTION in message
    assert "virtual environment" in message


def test_this_projects_metadata_from_before_the_rename_is_not_taken_for_docker_enter(tmp_path, monkeypatch):
    _fake_installed_distribution(tmp_path, CONFLICTING_DISTRIBUTION, "0.1.0", f"{OWN_SUMMARY_START} by test-time ...")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_conflicting_installation()
