"""Carlini & Wagner's L2 attack (S&P 2017): the smallest L2 perturbation that changes a point's class.

Where PGD asks "is there an adversarial input within eps?", C&W minimizes ``||delta||_2^2 + c * f(x + delta)``
with ``f = max(Z_y - max_{j != y} Z_j, -kappa)`` on the logits ``Z``. The box [0, 1] is kept by optimizing
``w`` with ``x + delta = (tanh(w) + 1) / 2`` (Adam on ``w``), and ``c`` is binary-searched per point: up
(x10 until a first success) where no adversarial was found, halfway down where one was. Working on logits
rather than on the softmax is what broke defensive distillation, whose temperature-scaled logits saturate
the softmax so that cross-entropy gradients vanish (Carlini & Wagner 2016).

Every Adam step queries ``model`` on the whole batch (it may be a dynamic defense); an iterate counts as
adversarial when the query classifies it wrongly (by at least ``kappa``). Per point the attack keeps the
adversarial of smallest L2 norm over all queries.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dent.attacks.config import CW_NORM, CWSection
from dent.attacks.pgd import answered_right, logit_margin
from dent.attacks.wrappers import attack_view, describe_view
from dent.defenses.detection import detection_notes, rejects
from dent.errors import InvalidInputError
from dent.threat import ThreatModel

#: Adam steps per binary-search step when ``attack.n_iter`` is not set (C&W ran up to 10,000).
DEFAULT_N_ITER = 100
#: ``c`` at or above this has never succeeded: the search still multiplies it by 10.
_NO_UPPER = 1e10
#: Keeps ``atanh`` of pixels at exactly 0 or 1 finite.
_TANH_SHRINK = 1 - 1e-6


@dataclass
class CWResult:
    x_adv: Tensor  # the smallest-L2 adversarial found per point; the clean input where none was found
    l2: Tensor  # float [B]: ||x_adv - x||_2, inf where no adversarial was found


def _to_box(w: Tensor) -> Tensor:
    return (torch.tanh(w) + 1) / 2


def _next_const(const: Tensor, lower: Tensor, upper: Tensor, succeeded: Tensor) -> Tensor:
    """C&W's binary search on ``c`` (updates ``lower`` / ``upper`` in place)."""
    upper.copy_(torch.where(succeeded, torch.minimum(upper, const), upper))
    lower.copy_(torch.where(succeeded, lower, torch.maximum(lower, const)))
    bracketed = upper < _NO_UPPER
    return torch.where(bracketed, (lower + upper) / 2, const * 10)


def cw_l2(model: nn.Module, x: Tensor, y: Tensor, *, n_iter: int = DEFAULT_N_ITER, search_steps: int = 9,
          initial_const: float = 1e-3, confidence: float = 0.0, lr: float = 1e-2, rejecting: bool = False,
          progress: bool = False) -> CWResult:
    """Untargeted C&W L2 against ``model`` on the batch ``x`` (in [0, 1]) with labels ``y``.

    ``rejecting``: the model is a detector (K + 1 logits, the last "rejected"); an adversarial must be
    misclassified and not rejected, and the margin treats the reject class like the label (C&W 2017).

    ``n_iter`` Adam steps for each of ``search_steps`` values of ``c``; a search step stops early (as C&W's
    does) when the batch's objective has not fallen by 0.01% over the last tenth of its steps.
    """
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise InvalidInputError(
            f"cw_l2 expects images [B, C, H, W] and labels [B], got {list(x.shape)} and {list(y.shape)}")
    if n_iter < 1 or search_steps < 1:
        raise InvalidInputError(f"cw_l2 needs n_iter >= 1 and search_steps >= 1, got {n_iter} and {search_steps}")
    x = x.detach()
    y = y.detach()
    w0 = torch.atanh((2 * x - 1) * _TANH_SHRINK)
    const = torch.full((len(x),), float(initial_const), device=x.device)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, _NO_UPPER)
    best_l2 = torch.full_like(const, math.inf)
    best_x = x.clone()
    check_every = max(1, n_iter // 10)

    bar = tqdm(total=search_steps * n_iter, desc="cw_l2", unit="step", leave=False, disable=not progress)
    for _ in range(search_steps):
        w = w0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        succeeded = torch.zeros_like(const, dtype=torch.bool)
        previous = math.inf
        for step in range(n_iter):
            with torch.enable_grad():
                x_new = _to_box(w)
                logits = model(x_new).float()
                margin = logit_margin(logits, y, rejecting)
                l2_sq = (x_new - x).flatten(1).pow(2).sum(dim=1)
                objective = (l2_sq + const * torch.clamp(-margin, min=-confidence)).sum()
                w.grad = torch.autograd.grad(objective, [w])[0]
            optimizer.step()
            bar.update(1)
            with torch.no_grad():
                adversarial = ~answered_right(logits, y, rejecting) & (margin >= confidence)
                l2 = l2_sq.detach().sqrt()
                better = adversarial & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best_x[better] = x_new.detach()[better]
                succeeded |= adversarial
            if step % check_every == 0:
                if objective.item() > previous * 0.9999:
                    break
                previous = objective.item()
        const = _next_const(const, lower, upper, succeeded)
    bar.close()
    return CWResult(x_adv=best_x, l2=best_l2)


def run_cw_l2(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int, progress: bool = False):
    """The ``cw_l2`` attack runner (see :mod:`dent.attacks.registry`).

    C&W differentiates what the defense's declarations call for (:func:`~dent.attacks.wrappers.attack_view`:
    BPDA through its surrogate if it is not differentiable, EOT over ``attack.eot_iter`` draws if it is
    randomized). A point is robust if no adversarial within ``eps`` was found and the defense classifies the
    submitted input (that adversarial, else the clean input) correctly. ``notes.l2`` lists the smallest L2
    norm found per point (null where none was).
    """
    from dent.attacks.registry import AttackOutcome

    if ThreatModel(point.norm) is not CW_NORM:
        raise InvalidInputError(f"cw_l2 is an {CW_NORM.value} attack; its threat norm must be {CW_NORM.value}, "
                                f"got {ThreatModel(point.norm).value}")
    cw = point.cw or CWSection()
    n_iter = point.n_iter or DEFAULT_N_ITER
    rejecting = rejects(model)
    result = cw_l2(attack_view(model, point.eot_iter), x, y, n_iter=n_iter, search_steps=cw.search_steps,
                   initial_const=cw.initial_const, confidence=cw.confidence, lr=cw.lr, rejecting=rejecting,
                   progress=progress)
    within = result.l2 <= point.eps
    submitted = torch.where(within.view(-1, 1, 1, 1), result.x_adv, x)
    with torch.no_grad():
        answers = model(submitted)
    pred = answers.argmax(dim=1)
    robust = ~within & (pred == y)  # (a detector: the submitted clean input must be classified, not rejected)
    found = [float(v) if math.isfinite(v) else None for v in result.l2.tolist()]
    norms = [v for v in found if v is not None]
    notes = {"view": describe_view(model, point.eot_iter), "budget": {"n_iter": n_iter, **cw.to_dict()},
             "l2": found, "median_l2": statistics.median(norms) if norms else None}
    if rejecting:
        notes["detection"] = detection_notes(answers)
    return AttackOutcome(robust={"cw_l2": robust.cpu()}, pred={"cw_l2": pred.cpu()}, notes=notes,
                         x_adv={"cw_l2": submitted.detach().cpu()})


#: The runner counts a detector's rejection as defended (the evaluation runner refuses other attacks on detectors).
run_cw_l2.reject_aware = True
