"""Gradient-masking diagnostic: the plain input gradient of a defense at its clean inputs.

A gradient attack that queries the defense directly (the paper's protocol, AutoAttack, PGD) starts from this
gradient. Where it is exactly zero (no gradient at all, e.g. a codec outside autograd; or a step function
such as bit-depth reduction) or not finite, such an attack cannot make progress and its robust accuracy
measures the masking, not robustness (Athalye, Carlini, Wagner 2018): BPDA (``attack.name declared_apgd``)
or the adaptive attacks are the ones to trust there. The report flags such defenses. A randomized defense's
gradient is the one of its draw for this call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.attacks.wrappers import PlainGradient


def logits_and_plain_gradient(defense: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, int]]:
    """The defense's logits for ``x`` (one call) and how many of its points have a zero or non-finite input
    gradient of the cross-entropy: ``{"n", "zero", "nonfinite"}``. The gradient is the one plain attacks take
    (:class:`~dent.attacks.wrappers.PlainGradient`: zero where the defense runs outside autograd)."""
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        logits = PlainGradient(defense)(xr)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xr)
    flat = grad.flatten(1)
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    zero = ~nonfinite & (flat == 0).all(dim=1)
    return logits.detach(), {"n": len(x), "zero": int(zero.sum()), "nonfinite": int(nonfinite.sum())}
