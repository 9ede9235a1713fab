"""dent's distribution name, and the unrelated project that holds the name ``dent`` on the package index.

PyPI's ``dent`` is Docker ENTer (cynic-net/dent), a Docker tool: its wheel installs a top-level package ``dent``
and a ``dent`` command, as this project does. dent is therefore distributed as ``dent-defense`` and keeps the
import name and the command (renaming them would break every script and stored config header for a clash that
only exists when both projects are installed in one environment). Installed together, the later install
overwrites the earlier one's ``dent/__init__.py`` and ``dent`` command, and uninstalling either deletes files the
other needs; :func:`warn_if_conflicting_installation` says so on import instead of letting that fail obscurely.
"""

from __future__ import annotations

import warnings
from importlib import metadata

#: The name to install dent by (``pip install dent-defense``) and to look its version up by.
DISTRIBUTION = "dent-defense"

#: The unrelated distribution that installs the same top-level package and command.
CONFLICTING_DISTRIBUTION = "dent"


class ConflictingInstallationWarning(UserWarning):
    """Docker ENTer (``pip install dent``) is installed beside dent in the same environment."""


#: How this project's own summary starts (pyproject's ``description``, kept equal by a test): checkouts installed
#: before the rename still carry metadata named ``dent`` (``src/dent.egg-info``), which is not Docker ENTer.
OWN_SUMMARY_START = "Dynamic adversarial defense"


def conflicting_installation() -> str | None:
    """The version of Docker ENTer installed in this environment, or None when it is not installed."""
    try:
        found = metadata.distribution(CONFLICTING_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    if (found.metadata["Summary"] or "").startswith(OWN_SUMMARY_START):
        return None  # this project's metadata from before the rename
    return found.version


def warn_if_conflicting_installation() -> None:
    version = conflicting_installation()
    if version is None:
        return
    warnings.warn(
        f"the distribution {CONFLICTING_DISTRIBUTION!r} {version} (Docker ENTer, an unrelated project) is installed "
        f"beside {DISTRIBUTION!r}: both install the top-level package 'dent' and the command 'dent', so whichever "
        f"was installed last has overwritten the other's files, and uninstalling either breaks the other. Give dent "
        f"its own virtual environment: python -m venv .venv && . .venv/bin/activate && pip install {DISTRIBUTION} "
        f"(or pip install -e . from a checkout).", ConflictingInstallationWarning, stacklevel=3)
