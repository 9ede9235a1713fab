"""A differentiable Gaussian blur with a learnable width: dent's input adaptation (Sigma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Widths below this many pixels are treated as this width: the blur is then exactly the identity (the
#: neighbour taps underflow to 0), and dividing by a zero sigma could not produce NaNs.
MIN_SIGMA = 1e-3


def kernel_radius(sigma: Tensor, max_kernel_size: int) -> Tensor:
    """Half-width ceil(3 sigma) per input, i.e. a kernel of 2*ceil(3 sigma)+1 taps capped at max_kernel_size.

    The size follows the current sigma (small blurs stay cheap) and is a step function of it, so no
    gradient flows through it.
    """
    return torch.ceil(3 * sigma.detach()).clamp(max=max_kernel_size // 2).long()


def gaussian_blur(images: Tensor, sigma: Tensor, max_kernel_size: int) -> Tensor:
    """Blur ``images`` [B, C, H, W] with a Gaussian of width ``sigma`` pixels, shape [1] (shared) or [B].

    Separable (a row then a column pass) and differentiable w.r.t. both ``images`` and ``sigma``. Each input
    gets its own truncated, renormalized kernel even when widths differ within the batch, so an input's
    output never depends on the others. Borders are padded by replication, which is defined for any
    kernel/image size (reflection needs the image to be larger than the kernel radius).
    """
    batch, channels, height, width = images.shape
    sigma = sigma.to(images.dtype).clamp_min(MIN_SIGMA).expand(batch)
    radius = kernel_radius(sigma, max_kernel_size)
    reach = int(radius.max())
    offsets = torch.arange(-reach, reach + 1, device=images.device, dtype=images.dtype)
    gauss = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    gauss = torch.where(offsets.abs() <= radius[:, None], gauss, 0.0)
    kernel = (gauss / gauss.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, taps]
    # Fold the batch into channels so a grouped convolution gives every (input, channel) its own kernel.
    planes = images.reshape(1, batch * channels, height, width)
    planes = F.pad(planes, (reach, reach, reach, reach), mode="replicate")
    taps = 2 * reach + 1
    planes = F.conv2d(planes, kernel.view(-1, 1, 1, taps), groups=batch * channels)
    planes = F.conv2d(planes, kernel.view(-1, 1, taps, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


class FixedBlur(nn.Module):
    """:func:`gaussian_blur` at a fixed width ``sigma`` (pixels; a float, or a tensor of shape [1]): the
    input blur of dent with Sigma frozen, e.g. as the fixed part of the defense in a transfer surrogate."""

    def __init__(self, sigma: float | Tensor, max_kernel_size: int):
        super().__init__()
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float32).detach().reshape(1).clone())
        self.max_kernel_size = max_kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.sigma, self.max_kernel_size)
