"""Images from request bodies: PNG/JPEG uploads or a JSON array in [0, 1], checked before any of it is used.

Every refusal is a :class:`RejectedInput` with an HTTP status and a message saying what was expected. Images
must have the model's size (no resizing: a resized image is a different input than the client sent); an
upload's size is read from its header before anything is decoded, so a decompression bomb is refused
unopened.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dent.errors import InvalidInputError

#: The formats an upload may have; PIL tries no other decoder.
FORMATS = ("PNG", "JPEG")
#: Image modes converted to RGB; any other (alpha, 16-bit, CMYK) is refused rather than guessed at.
MODES = ("RGB", "L", "P")


class RejectedInput(InvalidInputError):
    """A request whose content cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageSpec:
    """What every image must be: 3 x ``size`` x ``size``, at most ``max_images`` of them per request."""

    size: int
    max_images: int
    channels: int = 3

    @property
    def shape(self) -> list[int]:
        return [self.channels, self.size, self.size]


def from_json(body: bytes, spec: ImageSpec) -> Tensor:
    """A JSON array of shape [3, H, W] (one image) or [N, 3, H, W], values in [0, 1] -> [N, 3, H, W] float32."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
        array = np.array(data)
    except RejectedInput:
        raise
    except (ValueError, RecursionError) as exc:  # bad JSON, UTF-8 or ragged nesting
        raise RejectedInput(f"the body is not a JSON array of numbers of shape {spec.shape} or "
                            f"[N, {', '.join(map(str, spec.shape))}]: {exc}", 400) from None
    if array.dtype.kind not in "iuf":
        raise RejectedInput(f"expected a JSON array of numbers, got elements of another type ({_kind(array)})")
    if array.ndim == 3:
        array = array[None]
    _check_shape(list(array.shape), spec)
    if not np.isfinite(array).all():  # 1e999 parses as inf
        raise RejectedInput("pixel values must be finite numbers in [0, 1], got a number too large for a float")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise RejectedInput(f"pixel values must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    return torch.from_numpy(array.astype(np.float32))


def _refuse_constant(name: str) -> None:
    raise RejectedInput(f"the JSON holds {name}: pixel values must be finite numbers in [0, 1]")


def _kind(array: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "O": "mixed or nested unevenly"}.get(array.dtype.kind, str(array.dtype))


def _check_shape(shape: list[int], spec: ImageSpec) -> None:
    if len(shape) != 4 or shape[1:] != spec.shape:
        raise RejectedInput(f"expected an array of shape {spec.shape} (one image) or [N, "
                            f"{', '.join(map(str, spec.shape))}], got shape {shape}")
    check_count(shape[0], spec)


def check_count(n: int, spec: ImageSpec) -> None:
    if n == 0:
        raise RejectedInput("the request holds no image")
    if n > spec.max_images:
        raise RejectedInput(f"the request holds {n} images; at most {spec.max_images} per request", 413)


def from_uploads(files: list[tuple[str, bytes]], spec: ImageSpec) -> Tensor:
    """Uploaded PNG/JPEG files ``(name, content)`` -> [N, 3, H, W] float32 in [0, 1]."""
    check_count(len(files), spec)
    return torch.stack([decode_image(name, content, spec) for name, content in files])


def decode_image(name: str, content: bytes, spec: ImageSpec) -> Tensor:
    """One PNG or JPEG file as a [3, H, W] tensor; its size is checked on the header, before decoding."""
    try:
        with Image.open(io.BytesIO(content), formats=FORMATS) as image:
            _check_header(name, image, spec)
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except RejectedInput:
        raise
    except UnidentifiedImageError:
        raise RejectedInput(f"file {name!r} is not a {' or '.join(FORMATS)} image", 400) from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise RejectedInput(f"file {name!r} is not a readable {' or '.join(FORMATS)} image: {exc}", 400) from None
    return torch.from_numpy(pixels).permute(2, 0, 1).div(255).contiguous()


def _check_header(name: str, image: Image.Image, spec: ImageSpec) -> None:
    width, height = image.size
    if (width, height) != (spec.size, spec.size):
        raise RejectedInput(f"file {name!r} is {width}x{height} pixels; the model expects {spec.size}x{spec.size} "
                            "(images are not resized: resize them before sending)")
    if image.mode not in MODES:
        raise RejectedInput(f"file {name!r} has image mode {image.mode!r}; expected RGB, grayscale (L) or a "
                            "palette (P) image, without alpha")
