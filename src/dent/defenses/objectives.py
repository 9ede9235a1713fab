"""Test-time objectives: unsupervised losses of a batch of logits that dent minimizes.

An objective is a function ``(logits [B, K], config) -> scalar``; registering one in :data:`OBJECTIVES`
makes it available by name in :class:`~dent.defenses.config.DentConfig`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from dent.registry import Registry

if TYPE_CHECKING:
    from dent.defenses.config import DentConfig

Objective = Callable[[Tensor, "DentConfig"], Tensor]

OBJECTIVES: Registry[Objective] = Registry("objective")


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of each softmax prediction, shape [B]."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the batch-mean prediction; high when the batch's predictions are spread over classes.

    The mean probability is taken in log space (logsumexp) so that no epsilon is needed inside the log.
    """
    log_mean = torch.logsumexp(logits.log_softmax(dim=1), dim=0) - math.log(logits.shape[0])
    return -(log_mean.exp() * log_mean).sum()


@OBJECTIVES.register("entropy")
def entropy(logits: Tensor, config: DentConfig) -> Tensor:
    """Mean prediction entropy (tent; the paper's eq. 3)."""
    return prediction_entropy(logits).mean()


@OBJECTIVES.register("infomax")
def infomax(logits: Tensor, config: DentConfig) -> Tensor:
    """Information maximization (SHOT, Liang et al. 2020): confident *and* diverse predictions.

    The diversity term keeps entropy minimization from collapsing the whole batch onto one class.
    """
    return prediction_entropy(logits).mean() - config.diversity_weight * marginal_entropy(logits)


#: The constant the SHOT loss (and the official dent+ code) adds inside its logarithms.
SHOT_LOG_EPS = 1e-5


def _entropy_with_eps(p: Tensor, dim: int) -> Tensor:
    return -(p * torch.log(p + SHOT_LOG_EPS)).sum(dim=dim)


@OBJECTIVES.register("shot")
def shot(logits: Tensor, config: DentConfig) -> Tensor:
    """Information maximization as the SHOT code and the official dent+ compute it: ``log(p + 1e-5)``.

    The same objective as ``infomax`` up to the constant, which biases both entropies (most for small
    probabilities) and so changes the gradients slightly; this is the official setting's loss, exactly.
    """
    p = logits.softmax(dim=1)
    return _entropy_with_eps(p, dim=1).mean() - config.diversity_weight * _entropy_with_eps(p.mean(dim=0), dim=0)


def per_input(name: str, config: DentConfig) -> bool:
    """Whether objective ``name`` under ``config`` is a batch mean of one term per input, so that each input's
    gradient depends on that input alone: ``entropy``, and ``infomax`` or ``shot`` without their diversity term
    (``diversity_weight`` 0), the entropy of the batch-mean prediction, which couples batch-mates. An objective
    registered elsewhere is not known to be."""
    if name == "entropy":
        return True
    return name in ("infomax", "shot") and config.diversity_weight == 0
