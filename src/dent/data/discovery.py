"""Where the data lives: an explicit folder, else ``$DENT_DATA``, else ``../shared/data``, else ``./data``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dent.data.datasets import DATASETS, DatasetInfo
from dent.data.formats import holds_dataset, layouts
from dent.errors import DataNotFoundError


@dataclass(frozen=True)
class Place:
    description: str
    folder: Path | None
    unavailable: str = ""  # why there is no folder to look in, when ``folder`` is None


def find_data_dir(explicit: str | Path | None = None, dataset: str = "cifar10") -> Path:
    """The first folder that holds ``dataset`` in a supported format.

    An explicit folder is the only place searched: a wrong ``data.dir`` is reported, not silently replaced.
    Otherwise: ``$DENT_DATA``; ``../shared/data`` from the working directory; ``../shared/data`` beside the
    source checkout; ``./data``. Raises :class:`DataNotFoundError` listing each place and why it did not fit.
    """
    info = DATASETS.get(dataset)
    places = [Place("data.dir (given explicitly)", Path(explicit))] if explicit is not None else default_places()
    searched: list[str] = []
    seen: set[Path] = set()
    for place in places:
        if place.folder is None:
            searched.append(f"{place.description}: {place.unavailable}")
            continue
        folder = place.folder.expanduser().resolve()
        reason = "the same folder as above" if folder in seen else unfit_reason(info, folder)
        if reason is None:
            return folder
        seen.add(folder)
        searched.append(f"{place.description} ({folder}): {reason}")
    raise DataNotFoundError(not_found_message(info, searched))


def default_places() -> list[Place]:
    env = os.environ.get("DENT_DATA")
    checkout = source_checkout()
    return [
        Place("$DENT_DATA", Path(env) if env else None, "DENT_DATA not set"),
        Place("../shared/data from the working directory", Path.cwd() / ".." / "shared" / "data"),
        Place("../shared/data beside the source checkout", checkout / ".." / "shared" / "data" if checkout else None,
              "dent is not running from a source checkout"),
        Place("./data", Path.cwd() / "data"),
    ]


def source_checkout() -> Path | None:
    """The repository root when this package runs from a source checkout (``<root>/src/dent/data/``)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "dent").is_dir() else None


def unfit_reason(info: DatasetInfo, folder: Path) -> str | None:
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    if not holds_dataset(info, folder):
        return f"holds no {info.title} data"
    return None


def not_found_message(info: DatasetInfo, searched: list[str]) -> str:
    return (
        f"{info.title} data not found. Searched:\n  - " + "\n  - ".join(searched) + "\n"
        f"A data folder holds {layouts(info)}.\n"
        f"Provide {info.title} by setting DENT_DATA=/path/to/folder, passing data.dir /path/to/folder, "
        f"or setting data.download true on a machine with internet (fetches {info.url}, md5-checked)."
    )


def download_dir(explicit: str | Path | None = None) -> Path:
    """Where ``download=True`` puts the release: the explicit folder, else ``$DENT_DATA``, else ``./data``."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    return Path(os.environ.get("DENT_DATA") or Path.cwd() / "data").expanduser().resolve()
