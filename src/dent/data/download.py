"""Fetch the official release, check its published md5 and extract it into a data folder."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.request
import zlib
from pathlib import Path

from dent.data.datasets import DatasetInfo
from dent.errors import CorruptFileError, DentError


def fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into the file ``dest``."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def download_release(info: DatasetInfo, root: Path) -> None:
    """Make ``root/<pickle_dir>/`` exist: fetch and verify the release unless a verified copy is there, then extract."""
    archive = root / info.archive_name
    if not (archive.is_file() and file_md5(archive) == info.md5):
        fetch_verified(info, archive)
    extract(info, archive, root)


def fetch_verified(info: DatasetInfo, archive: Path) -> None:
    """Download to ``<archive>.part``; only a file with the published md5 is renamed to ``archive``."""
    part = archive.with_name(archive.name + ".part")
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        fetch(info.url, part)
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        part.unlink(missing_ok=True)
        raise DentError(
            f"could not download {info.title} from {info.url} to {archive.parent}: {exc}\n"
            f"Without internet, fetch {info.archive_name} elsewhere, extract it and set DENT_DATA "
            f"(or data.dir) to the folder holding {info.pickle_dir}/."
        ) from None
    actual = file_md5(part)
    if actual != info.md5:
        part.unlink()
        raise CorruptFileError(
            f"downloaded {archive.name} from {info.url} has md5 {actual}, expected {info.md5}: "
            "the download is incomplete or altered; it was deleted, try again"
        )
    os.replace(part, archive)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(info: DatasetInfo, archive: Path, root: Path) -> None:
    # The "data" filter refuses members that would land outside ``root``; Pythons without it (< 3.10.12) get
    # a plain extraction, acceptable because the archive's md5 was checked against the published one.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, **safe)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CorruptFileError(f"{archive} could not be extracted: {exc}") from None
    if not (root / info.pickle_dir).is_dir():
        raise CorruptFileError(f"{archive} did not contain the folder {info.pickle_dir}/")
