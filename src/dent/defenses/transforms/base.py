"""The base class of input transforms: batched image -> image maps on [0, 1], with protocol traits."""

from __future__ import annotations

from torch import Tensor, nn

from dent.defenses.protocol import Identity
from dent.errors import InvalidInputError

#: How far outside [0, 1] an input pixel may be (float rounding) before it is an error.
RANGE_TOLERANCE = 1e-5


class Transform(nn.Module):
    """An input transform [B, C, H, W] in [0, 1] -> same shape in [0, 1].

    Subclasses implement :meth:`apply` and override the traits of :mod:`dent.defenses.protocol` they differ
    in; the BPDA surrogate of a non-differentiable transform is the identity (the straight-through estimator
    of Athalye et al. 2018), since every transform here approximately keeps its input.
    """

    differentiable = True
    randomized = False
    cost = 0.0

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, type(self).__name__)
        return self.apply(x)

    def apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bpda_surrogate(self) -> nn.Module:
        return Identity()


def check_images(x: Tensor, where: str) -> None:
    """A batch of images [B, C, H, W] with values in [0, 1]; else :class:`InvalidInputError`."""
    if x.dim() != 4:
        raise InvalidInputError(f"{where}: expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise InvalidInputError(f"{where}: expected pixel values in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")
