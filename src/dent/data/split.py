"""A loaded data split: images, labels and the class names they index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dent.errors import InvalidInputError


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class Split:
    """``images``: float32 [N, 3, H, W] in [0, 1]; ``labels``: int64 [N], indices into ``classes``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str  # e.g. "cifar10-test"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise InvalidInputError(
                f"{self.name}: images must be float32 [N, 3, H, W], got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise InvalidInputError(
                f"{self.name}: labels must be int64 [{len(self.images)}], got {self.labels.dtype} {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> Split:
        """The images at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[index], self.labels[index], self.classes, self.name)

    @classmethod
    def from_uint8(cls, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], name: str) -> Split:
        """Build a split from uint8 [N, 3, H, W] pixels (as stored and cached) and integer labels."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
        return cls(pixels, torch.from_numpy(np.asarray(labels, dtype=np.int64)), tuple(classes), name)


def images_and_labels(data: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.images`` and ``data.labels`` of any split-like object, checked: float [N, C, H, W] and integer [N]."""
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InvalidInputError(
            f"{who}: expected an object with tensors .images [N, C, H, W] and .labels [N] (e.g. a dent.Split), "
            f"got {type(data).__name__}"
        )
    if images.dim() != 4 or not images.is_floating_point():
        raise InvalidInputError(f"{who}: images must be a float tensor [N, C, H, W], got {images.dtype} {list(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise InvalidInputError(
            f"{who}: labels must be an integer tensor [{len(images)}] (one per image), got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    return images, labels
