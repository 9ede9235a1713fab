"""Random resizing and padding (Xie, Wang, Zhang, Ren, Yuille 2018), keeping the input's size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dent.defenses.transforms.base import Transform


class RandomResizePad(Transform):
    """Each image resized (bilinear) to a random side ``r`` in [ceil(min_scale * H), H] and zero-padded at a
    random offset back to H x W.

    Xie et al. enlarge 299 to [299, 331) and pad to 331, which changes the model's input size; shrinking into
    the original size is the same randomization for models with a fixed input size. Randomized (attacks use
    EOT); differentiable (bilinear resizing and padding are).
    """

    randomized = True
    cost = 0.05

    def __init__(self, min_scale: float = 0.8):
        super().__init__()
        self.min_scale = min_scale

    def apply(self, x: Tensor) -> Tensor:
        return torch.cat([self._one(image[None]) for image in x])

    def _one(self, image: Tensor) -> Tensor:
        h, w = image.shape[2:]
        low = max(1, math.ceil(self.min_scale * h))
        side = int(torch.randint(low, h + 1, ()).item())
        rw = max(1, round(side * w / h))
        resized = F.interpolate(image, size=(side, rw), mode="bilinear", align_corners=False).clamp(0, 1)
        top = int(torch.randint(0, h - side + 1, ()).item())
        left = int(torch.randint(0, w - rw + 1, ()).item())
        return F.pad(resized, (left, w - rw - left, top, h - side - top))
