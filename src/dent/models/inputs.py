"""What a model expects of its input, checked before a forward pass turns a mismatch into a conv error."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from dent.errors import InvalidInputError


def input_channels(model: nn.Module, who: str) -> Optional[int]:
    """The channel count of ``model``'s first registered 2-D convolution (``None``: no conv, or a lazy one).

    Registration order is the forward order in every architecture of :mod:`dent.models` and in usual
    ``nn.Sequential`` stems. ``who`` names the caller in the error raised when ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"{who}: expected a torch.nn.Module (the static model), got {type(model).__name__}")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None and conv.in_channels > 0 else None


def check_channels(expected: Optional[int], images: Tensor, who: str) -> None:
    """Raise :class:`InvalidInputError` when a [B, C, H, W] batch has other than ``expected`` channels."""
    if expected is not None and images.dim() == 4 and images.shape[1] != expected:
        raise InvalidInputError(
            f"{who}: the model's first convolution expects {expected}-channel images, got {images.shape[1]} "
            f"channel(s) in a batch of shape {list(images.shape)}"
        )
