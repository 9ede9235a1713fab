"""Reader for the official python-pickle releases (``cifar-10-batches-py/``, ``cifar-100-python/``).

Each batch file is a pickled dict: ``b"data"`` holds uint8 rows of 3 * 32 * 32 values in CHW order,
the labels sit under the data set's label key.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dent.data.datasets import DatasetInfo
from dent.errors import CorruptFileError

# The globals a CIFAR batch pickle needs (numpy arrays, Python-2 byte strings). Refusing all others means
# a tampered file cannot run code while being unpickled.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def locate(info: DatasetInfo, root: Path, split: str) -> Path | None:
    """The release folder under ``root``, if there is one (a folder missing the split's files is corrupt)."""
    folder = root / info.pickle_dir
    return folder if folder.is_dir() else None


def read(info: DatasetInfo, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, S, S] and int64 labels [N] of ``split``, batches concatenated in release order."""
    batches = [read_batch(info, folder / name) for name in info.pickle_files[split]]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def read_batch(info: DatasetInfo, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CorruptFileError(f"{info.title} release folder {path.parent} is missing the file {path.name!r}")
    batch = unpickle(path)
    size = info.image_size
    data, labels = batch.get(b"data"), batch.get(info.label_key)
    if data is None or labels is None:
        raise CorruptFileError(f"{path}: expected keys b'data' and {info.label_key!r}, found {list(batch)}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise CorruptFileError(
            f"{path}: b'data' should be uint8 rows of {3 * size * size} values, got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptFileError(f"{path}: expected {len(data)} integer labels, got {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(info.classes)):
        raise CorruptFileError(f"{path}: labels must lie in 0..{len(info.classes) - 1}")
    return data.reshape(-1, 3, size, size), labels.astype(np.int64)


def unpickle(path: Path) -> dict:
    """The batch dict in ``path``; anything unreadable is a :class:`CorruptFileError` naming the file."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to parse the bytes (truncation, garbage, refused globals) means corrupt
        raise CorruptFileError(f"{path} is not a readable {path.name} batch pickle: {exc}") from None
    if not isinstance(batch, dict):
        raise CorruptFileError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return batch
