"""What the package knows about each supported data set: class order, official release, file names.

Adding a data set of the CIFAR family is one :class:`DatasetInfo` entry: the readers take every name
they need (class order, pickle folder and files, label key, archive names) from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from dent.errors import UnknownNameError
from dent.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # registry name and file-name prefix, e.g. "cifar10"
    title: str  # for messages, e.g. "CIFAR-10"
    classes: tuple[str, ...]  # official label order: label = index
    url: str  # official python-pickle release
    md5: str  # published checksum of the file at ``url``
    pickle_dir: str  # folder the official release unpacks to
    pickle_files: Mapping[str, tuple[str, ...]]  # split -> batch files inside ``pickle_dir``
    label_key: bytes  # key of the labels in each batch dict
    image_size: int = 32

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.pickle_files)

    @property
    def archive_name(self) -> str:
        """File name of the official release, e.g. ``cifar-10-python.tar.gz``."""
        return self.url.rsplit("/", 1)[-1]

    def check_split(self, split: str) -> str:
        """The split's canonical (lower-case) name; an unknown split raises :class:`UnknownNameError`."""
        key = str(split).lower()
        if key not in self.pickle_files:
            raise UnknownNameError(f"unknown {self.name} split {split!r}; valid splits: {', '.join(self.splits)}")
        return key

    def split_name(self, split: str) -> str:
        """``cifar10-test``: the name of a loaded split and the stem of its ImageFolder archive."""
        return f"{self.name}-{split}"


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# Fine labels, in the order of ``fine_label_names`` in the release's ``meta`` file.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

DATASETS: Registry[DatasetInfo] = Registry("dataset")

DATASETS.register("cifar10", DatasetInfo(
    name="cifar10",
    title="CIFAR-10",
    classes=CIFAR10_CLASSES,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    pickle_dir="cifar-10-batches-py",
    pickle_files=MappingProxyType({
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }),
    label_key=b"labels",
))

DATASETS.register("cifar100", DatasetInfo(
    name="cifar100",
    title="CIFAR-100",
    classes=CIFAR100_CLASSES,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    pickle_dir="cifar-100-python",
    pickle_files=MappingProxyType({"train": ("train",), "test": ("test",)}),
    label_key=b"fine_labels",
))
