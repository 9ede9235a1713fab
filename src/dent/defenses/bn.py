"""Adaptable BatchNorm: the wrapped model's BatchNorms with substitute affine parameters and statistics.

Dent never modifies the wrapped model's BatchNorm layers. While it runs, each one is temporarily replaced,
where its parent registers it, by an :class:`AdaptiveBatchNorm` that reads the original's buffers and
applies dent's own affine tensors; :func:`swapped` puts the originals back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Where a BatchNorm is registered: (parent module, attribute name, the BatchNorm).
Slot = tuple[nn.Module, str, nn.Module]


class AdaptiveBatchNorm(nn.Module):
    """Stands in for ``norm`` during a dent call.

    ``weight``/``bias`` are set by dent before each forward: ``None`` (the norm's own parameters), shape [C]
    (one set for the batch) or [B, C] (one set per input, applied by broadcasting). Statistics are the
    norm's running estimates or, with ``batch_stats`` (or for a norm that tracks none), estimates on the
    current batch: ``F.batch_norm`` in training mode *without* running buffers, so nothing is written back.
    """

    def __init__(self, norm: nn.Module, batch_stats: bool):
        super().__init__()
        self.norm = norm
        self.batch_stats = batch_stats
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        batch_stats = self.batch_stats or norm.running_mean is None
        mean, var = (None, None) if batch_stats else (norm.running_mean, norm.running_var)
        weight = norm.weight if self.weight is None else self.weight
        bias = norm.bias if self.bias is None else self.bias
        if weight is None or weight.dim() == 1:
            return F.batch_norm(x, mean, var, weight, bias, batch_stats, 0.0, norm.eps)
        normalized = F.batch_norm(x, mean, var, None, None, batch_stats, 0.0, norm.eps)
        shape = weight.shape + (1,) * (x.dim() - 2)
        return torch.addcmul(bias.view(shape), normalized, weight.view(shape))


def batch_norm_slots(root: nn.Module) -> list[Slot]:
    """Every registration of a BatchNorm strictly below ``root`` (a norm registered twice appears twice)."""
    # parent._modules, not named_children(): the latter skips a second name for the same module.
    return [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent._modules.items()
        if isinstance(child, BATCH_NORMS)
    ]


@contextmanager
def swapped(slots: list[Slot], replacements: dict[nn.Module, AdaptiveBatchNorm]) -> Iterator[None]:
    """Register ``replacements[norm]`` in place of each norm for the duration of the block."""
    try:
        for parent, name, norm in slots:
            parent._modules[name] = replacements[norm]
        yield
    finally:
        for parent, name, norm in slots:
            parent._modules[name] = norm
