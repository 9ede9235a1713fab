"""The reject convention: a detecting defense answers K + 1 logits, the last one meaning "rejected".

Carlini & Wagner (AISec 2017) combine a classifier's logits ``Z`` (K) and a detector into one model so that
one attack objective covers both: ``G_i = Z_i`` for ``i < K`` and ``G_K = (d + 1) * max_j Z_j``. That only
works for a positive largest logit (with ``max_j Z_j < 0`` a firing detector *lowers* ``G_K``). Here
``G_K = max_j Z_j + scale * d`` with ``d`` the detector logit (score minus threshold, positive = adversarial)
and ``scale > 0``. Then ``argmax G = K`` exactly when ``d > 0``, whatever the sign of the logits:

* ``d > 0``: ``G_K > max_j Z_j`` (forced by one float step where ``scale * d`` is too small to change the sum);
* ``d <= 0``: ``G_K <= max_j Z_j``; at ``d = 0`` the tie goes to the class, since ``argmax`` returns the
  first maximal index (a detector fires on ``score > threshold``, strictly).

The combined model is differentiable wherever classifier and detector are, so the attack C&W use against
detectors is a standard margin attack on ``G`` that treats the reject class like the true one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dent.defenses.protocol import behind_transforms, bpda_surrogate, composed_traits, declare
from dent.errors import InvalidInputError


def reject_logits(logits: Tensor, detector_logit: Tensor, scale: float = 1.0) -> Tensor:
    """The K + 1 logits [B, K + 1] of classifier ``logits`` [B, K] and ``detector_logit`` [B] (module docstring)."""
    if logits.dim() != 2 or detector_logit.shape != logits.shape[:1]:
        raise InvalidInputError(f"expected logits [B, K] and a detector logit [B], got {tuple(logits.shape)} "
                                f"and {tuple(detector_logit.shape)}")
    top = logits.amax(dim=1)
    reject = top + scale * detector_logit
    step_above = torch.nextafter(top.detach(), torch.full_like(top, math.inf))
    reject = torch.where(detector_logit > 0, torch.maximum(reject, step_above), reject)
    return torch.cat([logits, reject[:, None]], dim=1)


def predictions_with_reject(logits: Tensor) -> tuple[Tensor, Tensor]:
    """K + 1 logits [B, K + 1] -> (the classifier's label among the K classes [B], rejected [B] bool).

    ``rejected`` is ``argmax == K``; the label is the classifier's even where the input is rejected.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InvalidInputError(f"expected K + 1 >= 2 logits [B, K + 1], got shape {tuple(logits.shape)}")
    k = logits.shape[1] - 1
    return logits[:, :k].argmax(dim=1), logits.argmax(dim=1) == k


def reject_margin(logits: Tensor) -> Tensor:
    """[B]: the reject logit minus the largest class logit of K + 1 logits: positive exactly where rejected; for
    :class:`Rejecting` it is ``scale`` times the detector logit (score minus threshold), so it ranks inputs as the
    detector's score does."""
    return logits[:, -1] - logits[:, :-1].amax(dim=1)


def detection_notes(logits: Tensor) -> dict[str, list]:
    """For a unit's notes: per input, from a detecting defense's K + 1 ``logits``, its :func:`reject_margin` and
    the label its classifier gives (among the K classes, rejected or not)."""
    logits = logits.detach()
    return {"reject_margin": reject_margin(logits).cpu().tolist(),
            "classified": logits[:, :-1].argmax(dim=1).cpu().tolist()}


def rejects(module: nn.Module) -> bool:
    """Whether ``module`` answers K + 1 logits with a reject class (declares ``rejects = True``), also behind
    input transforms (:class:`~dent.defenses.protocol.Preprocessed`)."""
    inner, _ = behind_transforms(module)
    value = getattr(inner, "rejects", False)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{type(inner).__name__}.rejects must be True or False, got {value!r}")
    return value


class Rejecting(nn.Module):
    """``classifier``'s K logits plus a reject logit from ``detector`` (a module answering the detector logit
    [B], e.g. a :class:`~dent.defenses.detection.base.Detector`): K + 1 logits (:func:`reject_logits`).

    Traits: differentiable if both parts are (else BPDA on ``bpda_surrogate()``, each part replaced by its own
    surrogate), randomized / adaptive if either part is, costs add.
    """

    rejects = True

    def __init__(self, classifier: nn.Module, detector: nn.Module, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise InvalidInputError(f"Rejecting: scale must be > 0, got {scale}")
        self.classifier, self.detector, self.scale = classifier, detector, scale
        declare(self, composed_traits(classifier, detector))

    def forward(self, x: Tensor) -> Tensor:
        return reject_logits(self.classifier(x), self.detector(x), self.scale)

    def bpda_surrogate(self) -> nn.Module:
        return Rejecting(bpda_surrogate(self.classifier), bpda_surrogate(self.detector), self.scale)
