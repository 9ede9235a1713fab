"""Input transformations and randomized transforms as defenses (the first families of the defenses overview)."""

from dent.defenses.transforms.base import Transform
from dent.defenses.transforms.jpeg import JPEG
from dent.defenses.transforms.resize_pad import RandomResizePad
from dent.defenses.transforms.squeeze import BitDepth, MedianSmoothing
from dent.defenses.transforms.tvm import TotalVariationMin

__all__ = ["Transform", "JPEG", "BitDepth", "MedianSmoothing", "TotalVariationMin", "RandomResizePad"]
