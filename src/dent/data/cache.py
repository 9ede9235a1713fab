"""On-disk cache of decoded splits, so 50,000 JPEGs are decoded once per archive, not once per run.

Entries are uint8 images and int64 labels in an uncompressed ``.npz``, named by the split and a key
that changes whenever the source changes (see :func:`source_key`). They are written to a temporary
file and renamed into place, so a crash or a parallel run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]

#: Bump when the decoding changes, so old entries are not reused.
CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$DENT_CACHE``, else ``~/.cache/dent``."""
    return Path(os.environ.get("DENT_CACHE") or Path.home() / ".cache" / "dent")


def source_key(path: Path) -> str:
    """A key of a file's or folder tree's identity: resolved paths, sizes and modification times."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def cached(name: str, source: Path, decode: Callable[[], Arrays]) -> Arrays:
    """The arrays decoded from ``source``: from the cache when it holds them, else ``decode()``, then stored."""
    entry = cache_dir() / f"{name}-{source_key(source)}.npz"
    hit = read_entry(entry)
    if hit is not None:
        return hit
    arrays = decode()
    write_entry(entry, arrays)
    return arrays


def read_entry(entry: Path) -> Arrays | None:
    """The entry's arrays, or None when it is missing or unreadable (it is then rebuilt)."""
    try:
        with np.load(entry) as npz:
            return npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_entry(entry: Path, arrays: Arrays) -> None:
    """Store atomically; a cache that cannot be written only costs speed, so that is a warning."""
    images, labels = arrays
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the data cache {entry} ({exc}); set DENT_CACHE to a writable folder")
