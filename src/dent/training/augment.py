"""Standard CIFAR augmentation on tensors: random crop with zero padding and horizontal flip, batched and seeded."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Pad each image by ``padding`` zero pixels, crop a random window of the original size, flip half of them.

    All randomness comes from ``generator`` (drawn on the CPU), so the same generator state gives the same
    batch on any device.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    if flip:
        flipped = torch.rand(b, generator=generator).to(x.device) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(3), out)
    return out
