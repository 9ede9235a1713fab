"""Feature squeezing (Xu, Evans, Qi 2018): bit-depth reduction and median smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dent.defenses.transforms.base import Transform


class BitDepth(Transform):
    """Each pixel rounded to the nearest of ``2**bits`` levels in [0, 1].

    Not differentiable (its gradient is zero almost everywhere): attacks use BPDA with the identity.
    """

    differentiable = False

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = bits

    def apply(self, x: Tensor) -> Tensor:
        levels = 2 ** self.bits - 1
        return (x * levels).round() / levels


class MedianSmoothing(Transform):
    """Each pixel replaced by the median of the ``size`` x ``size`` window around it, per channel.

    As ``scipy.ndimage.median_filter(size=size, mode="mirror")`` per image and channel (Xu et al. use scipy's
    filter): an even ``size`` takes the window reaching ``size // 2`` pixels up and left of the pixel and
    its upper median (rank ``size**2 // 2``); borders are mirrored (the edge pixel not repeated). The
    gradient (to the median pixel of each window) is exact almost everywhere: differentiable.
    """

    cost = 0.05

    def __init__(self, size: int = 2):
        super().__init__()
        self.size = size

    def apply(self, x: Tensor) -> Tensor:
        k = self.size
        before, after = k // 2, (k - 1) // 2
        padded = F.pad(x, (before, after, before, after), mode="reflect" if k > 1 else "constant")
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # [B, C, H, W, k, k]
        return windows.reshape(*x.shape, k * k).kthvalue(k * k // 2 + 1, dim=-1).values
