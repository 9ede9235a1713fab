"""Output locations: create a directory to write into, and report why writing there failed.

Operating-system errors on the paths dent writes (a file where a directory should be, a read-only file
system, no permission, a full disk) are the user's to fix, so they become :class:`OutputError` naming the
path and what was expected, at the place of the write, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dent.errors import OutputError

#: How to choose another run directory, for messages about one.
RUN_DIR_HINT = "choose a writable output.root (or another output.name)"

_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def output_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """Create directory ``path`` (with its parents) and check that it can be written into.

    ``what`` names the directory in messages ("run directory"); ``hint`` says how to choose another one.
    The writability check catches a read-only file system before anything is written (``os.access``
    reports EROFS even to root).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(_join(f"{what} {path} is a file; expected a directory", hint)) from None
    except NotADirectoryError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise OutputError(_join(_describe(exc, path, what), hint)) from None
        raise OutputError(_join(f"cannot create {what} {path}: {blocker} is a file, not a directory", hint)) from None
    except OSError as exc:
        raise OutputError(_join(_describe(exc, path, what), hint)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(_join(f"{what} {path} is read-only (no write access); expected a writable directory", hint))
    return path


@contextmanager
def writing(path: str | Path, what: str, hint: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` inside the block into an :class:`OutputError`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(_join(_describe(exc, Path(path), what), hint)) from None


def _describe(exc: OSError, path: Path, what: str) -> str:
    """``exc`` (raised writing ``path``, or a file in it) in words: what failed and what was expected."""
    if exc.filename is None or Path(exc.filename) == path:
        where = f"{what} {path}"
    else:
        where = f"{what} {path} ({exc.filename})"
    reason = exc.strerror or str(exc)
    if exc.errno in _READ_ONLY:
        return f"cannot write {where}: {reason} (expected write access)"
    if exc.errno == errno.EISDIR:
        return f"cannot write {where}: it is a directory; expected a file"
    return f"cannot write {where}: {reason}"


def _join(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message
