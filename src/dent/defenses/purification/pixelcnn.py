"""A small PixelCNN (van den Oord et al. 2016) on 8-bit images: the density model of PixelDefend.

``PixelCNN(x)`` gives, for every subpixel, 256 logits of its value conditioned on the pixels before it in
raster order (rows top to bottom, each row left to right): a 7x7 convolution masked to exclude the centre
pixel ("mask A"), residual 3x3 convolutions that include it ("mask B"), and a 1x1 head. The three channels of
one pixel are modelled as independent given the pixels before it (no R -> G -> B ordering inside a pixel, as
PixelCNN++ has): PixelDefend then purifies a pixel with one forward pass instead of three. The likelihood is
a proper one (every subpixel's distribution sums to one), only weaker than a channel-ordered model's.

Because the masks only look up and left, the logits of a pixel depend only on the ``R = receptive_rows`` rows
above it and its own row, within ``R`` columns either side: :meth:`PixelCNN.pixel_logits` computes them on
that window of the image, which is what makes pixel-by-pixel purification affordable on a CPU (a third of
the full forward pass on a 32x32 image).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.registry import Registry

#: Intensity levels of an 8-bit channel.
LEVELS = 256


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the pixels above and to the left of its centre (``include_centre``: and
    the centre pixel itself, all channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, include_centre: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.zeros(kernel_size, kernel_size)
        centre = kernel_size // 2
        mask[:centre] = 1
        mask[centre, : centre + int(include_centre)] = 1
        self.register_buffer("mask", mask.expand_as(self.weight).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = MaskedConv2d(channels, channels, 3, include_centre=True)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv(F.relu(h))


class PixelCNN(nn.Module):
    """Inputs [B, 3, H, W] in [0, 1] (8-bit values k/255); :meth:`forward` gives logits [B, 256, 3, H, W]."""

    def __init__(self, channels: int = 32, layers: int = 6, image_channels: int = 3):
        super().__init__()
        self.image_channels = image_channels
        self.first = MaskedConv2d(image_channels, channels, 7, include_centre=False)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(layers)])
        self.head = nn.Conv2d(channels, LEVELS * image_channels, 1)
        #: rows above a pixel that its logits depend on (3 of the 7x7 mask, 1 per 3x3 block)
        self.receptive_rows = 3 + layers

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self._features(x))
        b, _, height, width = logits.shape
        return logits.view(b, LEVELS, self.image_channels, height, width)

    def pixel_logits(self, x: Tensor, row: int, col: int) -> Tensor:
        """``forward(x)[..., row, col]`` [B, 256, 3], computed on the window of ``x`` that pixel depends on
        (``receptive_rows`` rows above it, as many columns on either side)."""
        r = self.receptive_rows
        top, left = max(0, row - r), max(0, col - r)
        h = self._features(x[:, :, top : row + 1, left : col + r + 1])[:, :, -1, col - left]
        return self.head(h[:, :, None, None]).view(len(x), LEVELS, self.image_channels)

    def _features(self, x: Tensor) -> Tensor:
        return F.relu(self.blocks(self.first(2 * x - 1)))


def levels(x: Tensor) -> Tensor:
    """Images in [0, 1] -> their 8-bit values (long, 0..255)."""
    return (x * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()


def bits_per_dim(logits: Tensor, x: Tensor) -> Tensor:
    """Negative log-likelihood of the 8-bit images ``x`` under ``logits`` [B, 256, C, H, W], in bits per
    subpixel, averaged over the batch (a uniform model scores 8)."""
    return F.cross_entropy(logits, levels(x)) / math.log(2)


DENSITY_MODELS: Registry[Callable[[], nn.Module]] = Registry("density model")
DENSITY_MODELS.register("pixelcnn", lambda: PixelCNN(channels=32, layers=6))
