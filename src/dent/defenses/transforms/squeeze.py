"""Feature squeezing (Xu, Evans, Qi 2018): bit-depth reduction and median smoothing."""

from __future__ import annotations

import torch
from torch import Tensor

from dent.defenses.transforms.base import Transform
from dent.errors import InvalidInputError


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

    Exactly ``scipy.ndimage.median_filter(size=size)`` per image and channel, the filter Xu et al. use: an
    even ``size`` takes the window reaching ``size // 2`` pixels up and left of the pixel and its upper
    median (rank ``size**2 // 2``); borders are reflected with the edge pixel repeated (scipy's default
    mode). The gradient (to the median pixel of each window) is exact almost everywhere: differentiable.
    """

    cost = 0.05

    def __init__(self, size: int = 2):
        super().__init__()
        self.size = size

    def apply(self, x: Tensor) -> Tensor:
        k = self.size
        before, after = k // 2, (k - 1) // 2
        padded = symmetric_pad(symmetric_pad(x, 2, before, after), 3, before, after)
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # [B, C, H, W, k, k]
        return windows.reshape(*x.shape, k * k).kthvalue(k * k // 2 + 1, dim=-1).values


def symmetric_pad(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """``x`` padded along ``dim`` by reflection with the edge repeated (numpy's 'symmetric', scipy's
    'reflect'), by at most the size of ``dim`` on each side."""
    n = x.shape[dim]
    if before > n or after > n:
        raise InvalidInputError(f"median window of {before + after + 1} pixels needs images of at least "
                                f"{max(before, after)} pixels, got {n}")
    parts = [x.narrow(dim, 0, before).flip(dim), x, x.narrow(dim, n - after, after).flip(dim)]
    return torch.cat(parts, dim=dim)
