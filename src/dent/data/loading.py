"""Load a split, or a class-stratified subset of one, from wherever the data is found."""

from __future__ import annotations

from pathlib import Path

from dent.data.datasets import DATASETS, DatasetInfo
from dent.data.discovery import download_dir, find_data_dir
from dent.data.download import download_release
from dent.data.formats import read_split_arrays
from dent.data.split import Split
from dent.data.stratify import stratified_indices
from dent.errors import DataNotFoundError


def load_split(
    dataset: str = "cifar10", split: str = "test", data_dir: str | Path | None = None, download: bool = False
) -> Split:
    """The whole split (see :func:`dent.data.find_data_dir` for where it is looked for).

    ``download=True`` fetches the official release into ``data_dir`` (else ``$DENT_DATA``, else ``./data``)
    when the data set is not found.
    """
    info = DATASETS.get(dataset)
    split = info.check_split(split)
    root = data_root(info, data_dir, download)
    images, labels = read_split_arrays(info, root, split)
    return Split.from_uint8(images, labels, info.classes, info.split_name(split))


def load_subset(
    dataset: str = "cifar10", split: str = "test", n: int | None = None, seed: int = 0,
    data_dir: str | Path | None = None, download: bool = False,
) -> Split:
    """``n`` class-stratified images of the split (see :func:`stratified_indices`); ``n=None``: the whole split."""
    full = load_split(dataset, split, data_dir, download)
    return full if n is None else full.subset(stratified_indices(full.labels, n, seed))


def data_root(info: DatasetInfo, data_dir: str | Path | None, download: bool) -> Path:
    try:
        return find_data_dir(data_dir, info.name)
    except DataNotFoundError:
        if not download:
            raise
    root = download_dir(data_dir)
    download_release(info, root)
    return root
