"""Data sets: finding, reading, caching and subsetting CIFAR-10 (and CIFAR-100).

``load_subset("cifar10", "test", n=1000, seed=0)`` is what evaluations use: 1,000 test images, 100 per
class, as float32 [N, 3, 32, 32] in [0, 1] with int64 labels in the official class order.
"""

from dent.data.datasets import DATASETS, DatasetInfo
from dent.data.discovery import find_data_dir
from dent.data.loading import load_split, load_subset
from dent.data.split import Split
from dent.data.stratify import stratified_indices

__all__ = ["DATASETS", "DatasetInfo", "Split", "find_data_dir", "load_split", "load_subset", "stratified_indices"]
