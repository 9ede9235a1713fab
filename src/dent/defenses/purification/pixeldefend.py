"""PixelDefend (Song, Kim, Nowozin, Ermon, Kushman 2018): purify an input towards the training distribution.

Each pixel, in raster order, is set to its most likely 8-bit value under a PixelCNN given the pixels already
purified, among the values within ``eps_defend`` of the input's (Song et al.'s Algorithm 1, greedy decoding).
The result stays in the L-infinity ball of radius ``eps_defend`` around the (8-bit) input. Purification is a
sequence of argmaxes: it has no useful gradient, so an attack differentiates the identity instead (BPDA), the
attack by which Athalye, Carlini and Wagner (2018) broke it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dent.defenses.purification.pixelcnn import LEVELS, PixelCNN, levels
from dent.defenses.transforms.base import Transform


class PixelDefend(Transform):
    """Greedy PixelCNN purification within ``eps_defend`` (in [0, 1] units; Song et al.: 16/255 against 8/255)."""

    differentiable = False
    #: One purification runs H * W windowed forwards of the PixelCNN (a 32x32 image: 1024 of them); with the
    #: project's small PixelCNN about 0.3 s per image on one CPU core, some 40 forward passes of a ResNet-18.
    cost = 40.0

    def __init__(self, density_model: PixelCNN, eps_defend: float = 16 / 255):
        super().__init__()
        self.density_model = density_model.eval().requires_grad_(False)
        self.eps_defend = eps_defend

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        radius = int(round(self.eps_defend * (LEVELS - 1)))
        original = levels(x.detach())
        values = torch.arange(LEVELS, device=x.device).view(1, LEVELS, 1)
        purified = original.clone()
        for row in range(x.shape[2]):
            for col in range(x.shape[3]):
                logits = self.density_model.pixel_logits(purified.to(x.dtype) / (LEVELS - 1), row, col)
                allowed = (values - original[:, None, :, row, col]).abs() <= radius  # [B, 256, C]
                purified[:, :, row, col] = logits.masked_fill(~allowed, float("-inf")).argmax(dim=1)
        return purified.to(x.dtype) / (LEVELS - 1)
