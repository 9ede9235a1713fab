"""APGD (pyautoattack's) on a whole batch at every query, for batch-dependent defenses and surrogates.

pyautoattack's ``perturb`` re-batches: each restart (and each target class of APGD-T) attacks only the
points still robust, so a batch-wise defense would adapt on a batch whose composition changes from run to
run. :func:`apgd_batch` instead runs APGD's single-run routine on the *whole* batch for every restart and
target class, so every query of the attacked model sees a batch of the same size and composition. A point
counts as broken as soon as one query misclassified it (it is robust only if every query classified it
correctly), the convention of :mod:`dent.attacks.pgd`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from dent.threat import ThreatModel
from dent.errors import InvalidInputError

#: pyautoattack's losses per APGD variant.
LOSSES = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}


@dataclass
class APGDBatchResult:
    robust: Tensor  # bool [B]: classified correctly by every query of the attacked model
    x_adv: Tensor  # the breaking input of broken points, the highest-loss iterate of the others
    runs: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per run: (highest-loss, breaking-or-last)
    queries: int = 0


def apgd_batch(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    attack: str = "apgd-ce",
    norm: ThreatModel | str = ThreatModel.LINF,
    eps: float,
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int = 9,
    eot_iter: int = 1,
    seed: int = 0,
) -> APGDBatchResult:
    """Run ``attack`` (apgd-ce | apgd-dlr | apgd-t) on the whole batch ``x`` (in [0, 1]) with labels ``y``.

    ``n_restarts`` runs per target class for APGD-T (targets: the 2nd .. (n_target_classes+1)-th most
    likely class of ``model`` on the clean batch), ``n_restarts`` runs for the others.
    """
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    if attack not in LOSSES:
        raise InvalidInputError(f"unknown APGD variant {attack!r}; valid: {', '.join(LOSSES)}")
    if n_iter < 1 or n_restarts < 1 or n_target_classes < 1 or eot_iter < 1:
        raise InvalidInputError("apgd_batch needs n_iter, n_restarts, n_target_classes and eot_iter >= 1")
    norm = ThreatModel(norm).value
    x = x.detach()
    y = y.detach()
    common = dict(n_iter=n_iter, norm=norm, n_restarts=1, eps=eps, seed=seed, eot_iter=eot_iter, device=x.device)
    if attack == "apgd-t":
        apgd = APGDAttack_targeted(model, n_target_classes=n_target_classes, **common)
    else:
        apgd = APGDAttack(model, loss=LOSSES[attack], **common)
    apgd.init_hyperparam(x)
    torch.random.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.random.manual_seed(seed)

    with torch.no_grad():
        logits = model(x)
    robust = logits.argmax(dim=1) == y
    queries = 1
    targets: list[Tensor | None] = [None]
    if attack == "apgd-t":
        order = logits.sort(dim=1)[1]
        n_classes = logits.shape[1]
        targets = [order[:, -k] for k in range(2, min(n_target_classes, n_classes - 1) + 2)]
    x_adv = x.clone()
    best_loss = torch.full((len(x),), -float("inf"), device=x.device)
    runs = []
    for target in targets:
        apgd.y_target = target
        for _ in range(n_restarts):
            x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x, y)
            queries += (n_iter + 1) * eot_iter
            broken_now = robust & ~acc.bool()
            x_adv[broken_now] = x_best_adv[broken_now]
            better = robust & ~broken_now & (loss_best > best_loss)
            x_adv[better] = x_best[better]
            best_loss = torch.where(better, loss_best, best_loss)
            robust &= acc.bool()
            runs.append((x_best.detach(), torch.where(_rows(~acc.bool(), x), x_best_adv, x_best).detach()))
    return APGDBatchResult(robust=robust, x_adv=x_adv, runs=runs, queries=queries)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))
