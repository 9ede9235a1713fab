"""What every detector shares: a score (higher = more adversarial), a threshold, and clear errors when used
before it was trained or calibrated.

A detector's ``forward(x)`` is its *detector logit* ``score(x) - threshold``: positive means "adversarial",
the input :class:`~dent.defenses.detection.reject.Rejecting` turns into a reject class. The threshold is
chosen on clean inputs at a target false-positive rate (:func:`threshold_at_fpr`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dent.defenses.protocol import Traits, traits_of
from dent.errors import DentError, InvalidInputError


class NotFittedError(DentError, RuntimeError):
    """A detector was used before it was trained (``fit``) or calibrated (``calibrate``), or loaded from either."""


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The detection threshold at false-positive rate ``fpr`` on ``clean_scores``.

    Convention: a detector fires when ``score > threshold`` (strictly), and the threshold is the empirical
    ``1 - fpr`` quantile of the clean scores taken as a clean score itself (numpy's ``inverted_cdf``): the
    ``n - m``-th smallest of the ``n`` clean scores with ``m = floor(fpr * n)``. So at most ``m`` (exactly ``m``
    without ties) clean inputs score above it: the detector's false-positive rate on these inputs is at most
    ``fpr``; with ``fpr * n < 1`` it is the largest clean score (no clean input rejected).
    """
    scores = clean_scores.detach().flatten().double()
    if not 0 <= fpr < 1:
        raise InvalidInputError(f"fpr must be in [0, 1), got {fpr}")
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        raise InvalidInputError(f"need at least one clean score, all finite; got {scores.numel()} scores")
    n = scores.numel()
    above = math.floor(fpr * n + 1e-9)  # the epsilon keeps fpr * n = 5 from rounding to 4.999...
    return float(scores.sort().values[n - above - 1])


class Detector(nn.Module):
    """Base class: subclasses implement :meth:`score` and, if it needs training, set ``needs_training`` and mark
    themselves trained in ``fit`` (:meth:`_mark_trained`).

    State (threshold, trained flag, fitted tensors) lives in buffers, so ``state_dict()`` stores a trained,
    calibrated detector and ``load_state_dict`` restores it into a freshly built one. The watched model is a
    submodule: its weights are part of the state dict too, so a stored detector is self-contained. Buffers
    named in ``sized_buffers`` take the stored shape on loading (fitted data whose size is known only after
    ``fit``).
    """

    needs_training = False
    sized_buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("trained", torch.tensor(not self.needs_training))

    def score(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """[B] scores of images ``x`` in [0, 1]; higher = more adversarial."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The detector logit ``score(x) - threshold`` [B]: positive exactly when the detector fires."""
        self.require_calibrated()
        return self.score(x) - self.threshold

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    def calibrate(self, clean_images: Tensor, fpr: float = 0.05, batch_size: int = 256) -> float:
        """Set (and return) the threshold at false-positive rate ``fpr`` on ``clean_images``
        (:func:`threshold_at_fpr`)."""
        self.threshold.fill_(threshold_at_fpr(scores_of(self, clean_images, batch_size), fpr))
        return float(self.threshold)

    def require_trained(self) -> None:
        if not bool(self.trained):
            raise NotFittedError(f"{type(self).__name__} has no trained checkpoint: call its fit(...) first or "
                                 "load_state_dict() a stored, trained one")

    def require_calibrated(self) -> None:
        if not self.calibrated:
            raise NotFittedError(f"{type(self).__name__} is not calibrated: its threshold is unset; call "
                                 "calibrate(clean_images, fpr) first (or fit(...) for a trained detector, or "
                                 "load_state_dict() a stored one)")

    def _mark_trained(self) -> None:
        """After ``fit``: trained, with the threshold at the fitted classifier's own decision boundary (logit 0)."""
        self.trained.fill_(True)
        self.threshold.fill_(0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        for name in self.sized_buffers:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def watched_traits(model: nn.Module, detector: str) -> Traits:
    """The traits of the model a differentiable detector reads; a non-differentiable model is refused, since the
    detector would have no BPDA surrogate (watch the differentiable classifier behind a transform instead)."""
    traits = traits_of(model)
    if not traits.differentiable:
        raise InvalidInputError(f"{detector} needs a differentiable model to read, got {type(model).__name__} "
                                "(differentiable = False)")
    return traits


def scores_of(detector: Detector, images: Tensor, batch_size: int = 256) -> Tensor:
    """``detector.score`` over ``images`` in batches, without gradients: [N]."""
    if images.shape[0] == 0:
        raise InvalidInputError(f"{type(detector).__name__}: need at least one image, got none")
    with torch.no_grad():
        return torch.cat([detector.score(chunk) for chunk in images.split(batch_size)])
