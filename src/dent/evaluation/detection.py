"""Metrics of detecting defenses, as pure functions of scores and per-point predictions (no store yet).

Detection quality: the ROC AUC of a score on clean vs adversarial inputs (adversarial = positive), and the
true-positive rate at a false-positive rate on clean inputs, with the threshold chosen on the clean scores
(:func:`~dent.defenses.detection.base.threshold_at_fpr`: fire on ``score > threshold``, the threshold the
empirical ``1 - fpr`` quantile of the clean scores).

Accuracy with reject (predictions as :func:`~dent.defenses.detection.reject.predictions_with_reject` gives
them): a clean input counts as correct only if it is classified correctly *and* not rejected (rejecting a clean
input is an error); an adversarial input counts as defended if it is rejected, or classified correctly and not
rejected. The per-point worst case over several attacks counts a point only if
it is defended under every one; given the clean predictions too, also only if its clean input is correct and
not rejected, Tramer's (ICML 2022) robust accuracy with detection, which a detector rejecting everything cannot
inflate. Every accuracy is a count out of N with its 95% Wilson interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from dent.defenses.detection.base import threshold_at_fpr
from dent.errors import InvalidInputError
from dent.evaluation.summary import wilson_interval

#: Per-point predictions of a detecting defense: (label among the K classes [N], rejected [N] bool).
Prediction = tuple[Tensor, Tensor]

__all__ = [
    "Proportion", "Prediction", "roc_auc", "roc_auc_interval", "threshold_at_fpr", "tpr_at_fpr", "clean_accuracy_with_reject",
    "defended_with_reject", "robust_accuracy_with_reject", "worst_case_with_reject",
]


@dataclass(frozen=True)
class Proportion:
    """``count`` of ``n`` points, with its 95% Wilson score interval."""

    count: int
    n: int

    @property
    def value(self) -> float:
        return self.count / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.count, self.n)

    @classmethod
    def of(cls, flags: Tensor) -> "Proportion":
        return cls(int(flags.sum()), flags.numel())


def _scores(scores: Tensor, what: str) -> Tensor:
    scores = torch.as_tensor(scores).detach().flatten().double()
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        raise InvalidInputError(f"{what}: expected at least one score, all finite; got {scores.numel()} scores")
    return scores


def roc_auc(clean_scores: Tensor, adversarial_scores: Tensor) -> float:
    """The ROC AUC of telling adversarial (positive) from clean inputs by a score, higher = more adversarial.

    The Mann-Whitney statistic with mid-ranks: the probability that a random adversarial input scores above a
    random clean one, ties counting one half, which is sklearn's ``roc_auc_score`` (the trapezoidal area under
    the ROC curve, ties included).
    """
    clean, adversarial = _scores(clean_scores, "clean scores"), _scores(adversarial_scores, "adversarial scores")
    pooled = torch.cat([clean, adversarial])
    _, group, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    below = counts.cumsum(0) - counts  # pooled scores strictly below each distinct value
    mid_rank = (below + (counts + 1) / 2).double()[group]
    n0, n1 = clean.numel(), adversarial.numel()
    return float((mid_rank[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def roc_auc_interval(auc: float, n_clean: int, n_adversarial: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """A 95% interval of a ROC AUC measured on ``n_clean`` and ``n_adversarial`` inputs: ``auc +- z * SE`` with
    Hanley & McNeil's (1982) standard error, ``SE^2 = (A (1 - A) + (n1 - 1)(Q1 - A^2) + (n0 - 1)(Q2 - A^2)) /
    (n0 n1)``, ``Q1 = A / (2 - A)``, ``Q2 = 2 A^2 / (1 + A)`` (n1 adversarial, n0 clean), clipped to [0, 1]."""
    if n_clean < 1 or n_adversarial < 1 or not 0 <= auc <= 1:
        raise InvalidInputError(f"roc_auc_interval needs an AUC in [0, 1] and at least one input of each kind; got "
                                f"{auc}, {n_clean} clean, {n_adversarial} adversarial")
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_adversarial - 1) * (q1 - auc ** 2) + (n_clean - 1) * (q2 - auc ** 2)) / (
        n_clean * n_adversarial)
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def tpr_at_fpr(clean_scores: Tensor, adversarial_scores: Tensor, fpr: float = 0.05) -> Proportion:
    """The adversarial inputs scoring above the threshold set on ``clean_scores`` at ``fpr`` (module docstring)."""
    threshold = threshold_at_fpr(_scores(clean_scores, "clean scores"), fpr)
    return Proportion.of(_scores(adversarial_scores, "adversarial scores") > threshold)


def _check(prediction: Prediction, labels: Tensor) -> tuple[Tensor, Tensor]:
    predicted, rejected = prediction
    if not (predicted.shape == rejected.shape == labels.shape and labels.dim() == 1):
        raise InvalidInputError(f"expected labels, predictions and reject flags of one shape [N], got "
                                f"{tuple(labels.shape)}, {tuple(predicted.shape)}, {tuple(rejected.shape)}")
    return predicted == labels, rejected.bool()


def clean_accuracy_with_reject(prediction: Prediction, labels: Tensor) -> Proportion:
    """Clean inputs classified correctly and not rejected."""
    correct, rejected = _check(prediction, labels)
    return Proportion.of(correct & ~rejected)


def defended_with_reject(prediction: Prediction, labels: Tensor) -> Tensor:
    """Per adversarial input [N] bool: rejected, or classified correctly (and then not rejected)."""
    correct, rejected = _check(prediction, labels)
    return correct | rejected


def robust_accuracy_with_reject(prediction: Prediction, labels: Tensor) -> Proportion:
    """Adversarial inputs that are defended (:func:`defended_with_reject`)."""
    return Proportion.of(defended_with_reject(prediction, labels))


def worst_case_with_reject(predictions: Iterable[Prediction], labels: Tensor,
                           clean: Prediction | None = None) -> Proportion:
    """Points defended under every attack (each attack's predictions on the same N points); with ``clean``, the
    clean predictions, only those whose clean input is also correct and not rejected."""
    flags = [defended_with_reject(prediction, labels) for prediction in predictions]
    if not flags:
        raise InvalidInputError("worst_case_with_reject needs the predictions of at least one attack")
    if clean is not None:
        correct, rejected = _check(clean, labels)
        flags.append(correct & ~rejected)
    return Proportion.of(torch.stack(flags).all(dim=0))
