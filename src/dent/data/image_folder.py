"""Reader for ImageFolder trees ``<split>/<class>/<file>.jpg|png`` and their ``<dataset>-<split>.tar.gz`` archives.

Labels come from the data set's official class order (CIFAR-10: airplane = 0 ... truck = 9), not from the
alphabetical order of the folders. Images are sorted by (label, file name), whatever the order on disk.
Decoded pixels are cached (:mod:`dent.data.cache`).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from dent.data.cache import Arrays, cached
from dent.data.datasets import DatasetInfo
from dent.errors import CorruptFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: (class folder name, file name, encoded bytes) of one image file.
Entry = tuple[str, str, bytes]


def locate_archive(info: DatasetInfo, root: Path, split: str) -> Path | None:
    path = root / f"{info.split_name(split)}.tar.gz"
    return path if path.is_file() else None


def locate_tree(info: DatasetInfo, root: Path, split: str) -> Path | None:
    """``root/<split>/`` when it has a folder named after one of the data set's classes."""
    folder = root / split
    if folder.is_dir() and any((folder / name).is_dir() for name in info.classes):
        return folder
    return None


def read_archive(info: DatasetInfo, path: Path, split: str) -> Arrays:
    return cached(info.split_name(split), path, lambda: decode_entries(info, path, split, archive_entries(path, split)))


def read_tree(info: DatasetInfo, folder: Path, split: str) -> Arrays:
    return cached(info.split_name(split), folder, lambda: decode_entries(info, folder, split, tree_entries(folder)))


def archive_entries(path: Path, split: str) -> Iterator[Entry]:
    """The files at ``<split>/<class>/<file>`` in a .tar.gz, read in archive order."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.isfile() and len(parts) == 3 and parts[0] == split:
                    yield parts[1], parts[2], tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CorruptFileError(f"{path} is not a readable .tar.gz archive (truncated or not a tar?): {exc}") from None


def tree_entries(folder: Path) -> Iterator[Entry]:
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(p for p in class_dir.iterdir() if p.is_file()):
            yield class_dir.name, file.name, file.read_bytes()


def decode_entries(info: DatasetInfo, source: Path, split: str, entries: Iterable[Entry]) -> Arrays:
    """uint8 images [N, 3, S, S] and int64 labels [N]; every class must have images."""
    label_of = {name: label for label, name in enumerate(info.classes)}
    decoded = []
    for folder, filename, data in entries:
        if filename.startswith(".") or not filename.lower().endswith(IMAGE_SUFFIXES):
            continue  # e.g. .DS_Store, macOS ._* resource forks, READMEs
        if folder not in label_of:
            raise CorruptFileError(
                f"{source}: folder {split}/{folder}/ is not a {info.title} class; "
                f"expected folders named {', '.join(info.classes)}"
            )
        member = f"{split}/{folder}/{filename}"
        decoded.append((label_of[folder], filename, decode_image(data, member, source, info.image_size)))
    present = {label for label, _, _ in decoded}
    missing = [name for label, name in enumerate(info.classes) if label not in present]
    if missing:
        raise CorruptFileError(
            f"{source}: no images for class(es) {', '.join(missing)}; "
            f"expected a folder {split}/<class>/ of images for each of the {len(info.classes)} classes"
        )
    decoded.sort(key=lambda item: item[:2])
    images = np.stack([pixels for _, _, pixels in decoded]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.array([label for label, _, _ in decoded], dtype=np.int64)


def decode_image(data: bytes, member: str, source: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] pixels of one encoded image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad bytes; all mean the file is unreadable
        raise CorruptFileError(f"{source}: {member} is not a readable image: {exc}") from None
    if pixels.shape[:2] != (size, size):
        height, width = pixels.shape[:2]
        raise CorruptFileError(f"{source}: {member} is {width}x{height} pixels, expected {size}x{size}")
    return pixels
