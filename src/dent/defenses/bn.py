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

from dent.errors import InvalidInputError

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Where a BatchNorm is registered: (parent module, attribute name, the BatchNorm).
Slot = tuple[nn.Module, str, nn.Module]


class AdaptiveBatchNorm(nn.Module):
    """Stands in for ``norm`` during a dent call.

    ``weight``/``bias`` are set by dent before each forward: ``None`` (the norm's own parameters), shape [C]
    (one set for the batch) or [B, C] (one set per input: with fixed statistics, a BatchNorm over the B*C
    planes of the input viewed as one sample, or for inputs that are not contiguous (channels-last) one
    multiply-add with the statistics folded in; else a broadcast over [B, C, 1, 1]). Statistics are the
    norm's running estimates or, with ``batch_stats`` (or for a norm that tracks none), estimates on the
    current batch: ``F.batch_norm`` in training mode *without* running buffers, so nothing is written back.

    ``folded``: per-input affine on fixed statistics computed as the official dent+ code does, the
    statistics folded into one scale and shift per input (``x * scale + shift``, ``scale = w / sqrt(var +
    eps)``, ``shift = b - mean * scale``). The same function, but other float rounding, which dent+'s steps
    amplify (see ``DentConfig.bn_arithmetic``).
    """

    def __init__(self, norm: nn.Module, batch_stats: bool, folded: bool = False):
        super().__init__()
        self.norm = norm
        self.batch_stats = batch_stats
        self.folded = folded
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self._repeats: tuple | None = None  # see _repeated_stats

    def _repeated_stats(self, n: int) -> tuple[Tensor, Tensor]:
        """The running mean and variance repeated ``n`` times, kept while they and ``n`` stay the same."""
        mean, var = self.norm.running_mean, self.norm.running_var
        versions = (mean._version, var._version)  # any in-place update of the buffers bumps these
        cached = self._repeats
        if cached is None or cached[0] != n or cached[1] is not mean or cached[2] is not var or cached[3] != versions:
            cached = (n, mean, var, versions, mean.detach().repeat(n), var.detach().repeat(n))
            if not torch.is_inference_mode_enabled():  # inference tensors could not be used with autograd later
                self._repeats = cached
        return cached[4], cached[5]

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        batch_stats = self.batch_stats or norm.running_mean is None
        mean, var = (None, None) if batch_stats else (norm.running_mean, norm.running_var)
        if batch_stats and x.numel() == x.shape[1]:
            raise InvalidInputError(
                f"stats='batch' estimates BatchNorm statistics on the test batch, but {type(norm).__name__}"
                f"({norm.num_features}) sees a single value per channel (input shape {list(x.shape)}); a batch of "
                "1 works only where every BatchNorm has spatial extent, so use stats='fixed' or a larger batch"
            )
        weight = norm.weight if self.weight is None else self.weight
        bias = norm.bias if self.bias is None else self.bias
        if weight is None or weight.dim() == 1:
            return F.batch_norm(x, mean, var, weight, bias, batch_stats, 0.0, norm.eps)
        shape = weight.shape + (1,) * (x.dim() - 2)
        # Per-input values broadcast over [B, C, 1, 1] in the activations' dtype (bf16 under autocast: a float32
        # scale would promote the activations to float32 for the next layer).
        if not batch_stats and self.folded:
            scale = weight * (var + norm.eps).rsqrt()
            shift = bias - mean * scale
            return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)
        if not batch_stats and not x.is_contiguous():
            # e.g. channels-last, which cannot be viewed as B*C planes: one multiply-add with the statistics folded in
            scale = weight * (var + norm.eps).rsqrt()
            return torch.addcmul((bias - mean * scale).view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))
        if not batch_stats and x.is_contiguous():
            # Per-input affine, fixed statistics: [B, C, ...] viewed as [1, B*C, ...] is a BatchNorm over B*C
            # channels with per-(input, channel) affine, one fused kernel forward and backward instead of a
            # normalization followed by a broadcast multiply-add (two more passes over the activations).
            n, c = weight.shape
            out = F.batch_norm(
                x.view(1, n * c, *x.shape[2:]), *self._repeated_stats(n), weight.reshape(-1),
                bias.reshape(-1), False, 0.0, norm.eps,
            )
            return out.view_as(x)
        normalized = F.batch_norm(x, mean, var, None, None, batch_stats, 0.0, norm.eps)
        return torch.addcmul(bias.view(shape).to(x.dtype), normalized, weight.view(shape).to(x.dtype))


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
