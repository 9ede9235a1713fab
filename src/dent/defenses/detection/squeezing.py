"""Feature squeezing as a detector (Xu, Evans, Qi, NDSS 2018).

The score of an input is the largest L1 distance, over the squeezers, between the model's softmax on the
input and on its squeezed version: an adversarial perturbation tuned to the model tends to be undone by
squeezing, a clean input's prediction barely moves. No training; the threshold is set on clean inputs at a
target false-positive rate (:meth:`~dent.defenses.detection.base.Detector.calibrate`). Xu et al.'s CIFAR-10
setting: 5-bit depth, 2 x 2 median (and non-local means, not here).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dent.defenses.detection.base import Detector
from dent.defenses.protocol import bpda_surrogate, differentiable_view, traits_of
from dent.defenses.transforms import BitDepth, MedianSmoothing
from dent.errors import InvalidInputError


class FeatureSqueezing(Detector):
    """Score ``max_s ||softmax(model(x)) - softmax(model(s(x)))||_1`` over the ``squeezers`` (image -> image).

    Not differentiable where a squeezer is not (bit depth): its BPDA surrogate is the same detector with each
    squeezer's straight-through view (the identity's gradient) and the threshold kept.
    """

    def __init__(self, model: nn.Module, squeezers: Sequence[nn.Module]):
        super().__init__()
        if not squeezers:
            raise InvalidInputError("FeatureSqueezing needs at least one squeezer")
        self.model, self.squeezers = model, nn.ModuleList(squeezers)
        parts = [traits_of(model)] + [traits_of(s) for s in squeezers]
        self.differentiable = all(t.differentiable for t in parts)
        self.randomized = any(t.randomized for t in parts)
        self.cost = (1 + len(squeezers)) * parts[0].cost + sum(t.cost for t in parts[1:])

    @classmethod
    def standard(cls, model: nn.Module, bits: int = 5, median_size: int = 2) -> "FeatureSqueezing":
        """Xu et al.'s two image squeezers: bit-depth reduction to ``bits`` and a ``median_size`` median filter."""
        return cls(model, [BitDepth(bits), MedianSmoothing(median_size)])

    def score(self, x: Tensor) -> Tensor:
        probs = self.model(x).softmax(dim=1)
        distances = [(probs - self.model(squeeze(x)).softmax(dim=1)).abs().sum(dim=1) for squeeze in self.squeezers]
        return torch.stack(distances).amax(dim=0)

    def bpda_surrogate(self) -> nn.Module:
        surrogate = FeatureSqueezing(bpda_surrogate(self.model), [differentiable_view(s) for s in self.squeezers])
        surrogate.threshold.copy_(self.threshold)
        return surrogate
