"""Total-variation minimization (Guo, Rana, Cisse, van der Maaten 2018), as an input transform.

Each image is reconstructed from a random subset of its pixels (each kept with probability ``keep``) by
minimizing ``0.5 * sum(mask * (z - x)**2) + weight * TV(z)`` over ``z`` in [0, 1], TV being the isotropic
total variation (smoothed by ``1e-6`` under the root so that it is differentiable at flat regions). The
problem is solved by ``iterations`` steps of projected gradient descent from ``x`` (Guo et al. use a
dedicated solver; a fixed number of steps keeps the transform batched and on the input's device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dent.defenses.transforms.base import Transform

#: Smoothing of the isotropic TV's square root.
TV_EPS = 1e-6


def total_variation(z: Tensor) -> Tensor:
    """The isotropic total variation of each image of ``z`` [B, C, H, W], summed over channels: [B]."""
    dx = z[:, :, :, 1:] - z[:, :, :, :-1]
    dy = z[:, :, 1:, :] - z[:, :, :-1, :]
    return ((dx[:, :, :-1, :] ** 2 + dy[:, :, :, :-1] ** 2 + TV_EPS).sqrt()).flatten(1).sum(dim=1)


class TotalVariationMin(Transform):
    """TV minimization on randomly dropped pixels. Randomized (the mask) and not differentiable as used
    (the solver's iterates are not differentiated): attacks use BPDA with the identity, and EOT."""

    differentiable = False
    randomized = True
    cost = 0.5

    def __init__(self, keep: float = 0.5, weight: float = 0.03, iterations: int = 30, lr: float = 0.1):
        super().__init__()
        self.keep, self.weight, self.iterations, self.lr = keep, weight, iterations, lr

    def apply(self, x: Tensor) -> Tensor:
        x = x.detach()
        mask = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < self.keep).to(x.dtype)
        z = x.clone()
        with torch.enable_grad():
            for _ in range(self.iterations):
                z.requires_grad_(True)
                objective = 0.5 * (mask * (z - x) ** 2).sum() + self.weight * total_variation(z).sum()
                (grad,) = torch.autograd.grad(objective, z)
                z = (z.detach() - self.lr * grad).clamp(0, 1)
        return z.detach()
