"""JPEG compression through a real codec (PIL's libjpeg), as an input transform (Das et al. 2017; Guo et al. 2018)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dent.defenses.transforms.base import Transform
from dent.errors import InvalidInputError


def to_uint8(x: Tensor) -> np.ndarray:
    """Images [B, C, H, W] in [0, 1] -> uint8 [B, H, W, C] (rounded to the nearest level)."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode one uint8 image [H, W, C] (C = 1 or 3) as JPEG at ``quality`` with PIL and decode it."""
    channels = image.shape[2]
    if channels not in (1, 3):
        raise InvalidInputError(f"JPEG needs 1 or 3 channels, got {channels}")
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer))
    return decoded.reshape(image.shape)


class JPEG(Transform):
    """Each image quantized to uint8, JPEG-encoded at ``quality`` (1-95) and decoded, back to [0, 1].

    Not differentiable (quantization): attacks use BPDA with the identity as the surrogate.
    """

    differentiable = False
    cost = 0.1

    def __init__(self, quality: int = 75):
        super().__init__()
        self.quality = quality

    def apply(self, x: Tensor) -> Tensor:
        decoded = np.stack([jpeg_roundtrip(image, self.quality) for image in to_uint8(x)])
        out = torch.from_numpy(decoded).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)
        return out / 255
