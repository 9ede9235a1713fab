"""The on-disk formats a data folder may hold, in order of preference, and how to read a split from it.

The official pickle release comes first: it holds the original pixels, while the ImageFolder copies in
circulation are often JPEG re-encodings of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dent.data import image_folder, pickle_release
from dent.data.cache import Arrays
from dent.data.datasets import DatasetInfo
from dent.errors import DataNotFoundError


@dataclass(frozen=True)
class Format:
    name: str
    locate: Callable[[DatasetInfo, Path, str], Path | None]  # (info, data folder, split) -> source or None
    read: Callable[[DatasetInfo, Path, str], Arrays]  # (info, source, split) -> uint8 images, int64 labels


FORMATS = (
    Format("official pickle release", pickle_release.locate, pickle_release.read),
    Format("ImageFolder archive", image_folder.locate_archive, image_folder.read_archive),
    Format("ImageFolder tree", image_folder.locate_tree, image_folder.read_tree),
)


def layouts(info: DatasetInfo) -> str:
    """The file names a data folder may hold, for messages."""
    return (
        f"{info.pickle_dir}/ (the official python release), "
        f"{info.name}-<split>.tar.gz or <split>/<class>/*.jpg|png (ImageFolder; split: {', '.join(info.splits)})"
    )


def find_source(info: DatasetInfo, root: Path, split: str) -> tuple[Format, Path] | None:
    for fmt in FORMATS:
        path = fmt.locate(info, root, split)
        if path is not None:
            return fmt, path
    return None


def holds_dataset(info: DatasetInfo, root: Path) -> bool:
    """Whether ``root`` holds any split of the data set in any format."""
    return any(find_source(info, root, split) is not None for split in info.splits)


def read_split_arrays(info: DatasetInfo, root: Path, split: str) -> Arrays:
    found = find_source(info, root, split)
    if found is None:
        raise DataNotFoundError(f"{root} holds {info.title} data but not its {split!r} split; looked for {layouts(info)}")
    fmt, path = found
    return fmt.read(info, path, split)
