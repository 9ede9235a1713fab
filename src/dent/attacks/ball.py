"""The primitives of projected gradient attacks in an epsilon ball: per-sample norms, projection onto the ball
and the [0, 1] box, random starting points and steepest-ascent steps, for Linf and L2.

Shared by the PGD attack (:mod:`dent.attacks.pgd`) and the training adversaries
(:mod:`dent.training.adversaries`). Random starts are drawn on the CPU from an explicit generator, so their
values do not depend on the device (and training stays reproducible and resumable bit for bit).
"""

from __future__ import annotations

import torch

from dent.threat import ThreatModel

_TINY = 1e-12


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped [B, 1, 1, 1] for broadcasting (at least 1e-12)."""
    return t.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t.dim() - 1)))


def project(x: torch.Tensor, x_adv: torch.Tensor, norm: ThreatModel | str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the intersection of the eps-ball around ``x`` and the [0, 1] box."""
    norm = ThreatModel(norm)
    if norm is ThreatModel.LINF:
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        delta = delta * torch.clamp(eps / per_sample_norm(delta), max=1.0)
        x_adv = x + delta
    # Clipping to the box moves each coordinate towards x, so it never leaves the ball again.
    return x_adv.clamp(0.0, 1.0)


def random_start(x: torch.Tensor, norm: ThreatModel | str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the eps-ball around ``x``, in the box (Linf: uniform per pixel; L2: random direction,
    radius U(0, eps))."""
    norm = ThreatModel(norm)
    if norm is ThreatModel.LINF:
        noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu") * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=x.dtype, device="cpu")
        noise = direction / per_sample_norm(direction) * radius * eps
    return project(x, x + noise.to(x.device), norm, eps)


def ascent_step(grad: torch.Tensor, norm: ThreatModel | str, step: float) -> torch.Tensor:
    """The steepest-ascent move of length ``step`` for the norm: sign for Linf, normalized gradient for L2."""
    if ThreatModel(norm) is ThreatModel.LINF:
        return step * grad.sign()
    return step * grad / per_sample_norm(grad)
