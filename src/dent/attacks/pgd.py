"""Projected gradient descent (Madry et al., 2018) in Linf and L2, with random starts and restarts, on the
cross-entropy or on Carlini & Wagner's logit margin (``attack.loss``), following the defense's own gradient or
the one its declarations call for (``attack.gradient declared``: BPDA, EOT).

The attack queries ``model`` once per step on the whole batch; ``model`` may be a dynamic defense that
adapts inside its forward call (the paper's protocol): the gradient is taken through the defended
model's final prediction only, not through its adaptation, and the prediction returned by each query
is the defense's answer for that submitted batch. A point counts as broken as soon as one query
(the clean batch, any step of any restart, or the final iterate) is misclassified; it is robust only if
every query classified it correctly. Restarts re-attack the whole batch, so the batch a dynamic defense
adapts on keeps its composition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dent.attacks import ball
from dent.attacks.config import PGDGradient, PGDLoss
from dent.attacks.wrappers import PlainGradient, attack_view, describe_view
from dent.defenses.detection import detection_notes, rejects
from dent.defenses.protocol import traits_of
from dent.errors import InvalidInputError
from dent.threat import ThreatModel


#: Steps when ``attack.n_iter`` is not set.
DEFAULT_N_ITER = 10


@dataclass
class PGDResult:
    x_adv: torch.Tensor  # the breaking example of broken points, the last iterate of robust ones
    robust: torch.Tensor  # bool [B]: classified correctly by every query
    pred: torch.Tensor  # int64 [B]: the prediction at the breaking query, or the last prediction


def logit_margin(logits: torch.Tensor, y: torch.Tensor, rejecting: bool = False) -> torch.Tensor:
    """Per point, ``max_{j != y} Z_j - Z_y`` on the logits ``Z`` [B, K]: positive where another class outscores
    the label. Its gradient is the logits' own, so it does not vanish where the softmax saturates.

    ``rejecting``: ``Z`` are a detector's K + 1 logits, the last one "rejected" (dent.defenses.detection); the
    reject class counts like the label, ``max_{j != y, K} Z_j - max(Z_y, Z_K)`` (Carlini & Wagner 2017: fool the
    classifier and stay under the detector's threshold)."""
    n = logits.shape[1]
    own = F.one_hot(y, n).bool()
    if rejecting:
        own[:, n - 1] = True
    true = logits.masked_fill(~own, float("-inf")).max(dim=1).values
    others = logits.masked_fill(own, float("-inf"))
    return others.max(dim=1).values - true


def answered_right(logits: torch.Tensor, y: torch.Tensor, rejecting: bool = False) -> torch.Tensor:
    """Per point, the query did not break it: the answer is the label, or (``rejecting``) the reject class."""
    pred = logits.argmax(dim=1)
    right = pred == y
    return right | (pred == logits.shape[1] - 1) if rejecting else right


def objective(logits: torch.Tensor, y: torch.Tensor, loss: PGDLoss, rejecting: bool = False) -> torch.Tensor:
    """What PGD ascends, summed over the batch."""
    if loss is PGDLoss.MARGIN:
        return logit_margin(logits, y, rejecting).sum()
    return F.cross_entropy(logits, y, reduction="sum")


def default_step_size(eps: float, n_iter: int) -> float:
    """Madry et al.'s rule of thumb: 2.5 * eps / n_iter, so the iterates can cross the ball."""
    return 2.5 * eps / n_iter


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: ThreatModel | str = ThreatModel.LINF,
    eps: float,
    n_iter: int = 10,
    step_size: float | None = None,
    n_restarts: int = 1,
    random_start: bool = True,
    loss: PGDLoss | str = PGDLoss.CE,
    rejecting: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> PGDResult:
    """Untargeted PGD ascending ``loss`` against ``model`` on the batch ``x`` (in [0, 1]) with labels ``y``.

    ``rejecting``: the model is a detector (K + 1 logits, the last "rejected"): a query that rejects a point does
    not break it, and the margin loss treats the reject class like the label. A point whose clean input is
    rejected is not robust (a rejected clean input is an error)."""
    norm = ThreatModel(norm)
    loss = PGDLoss(loss)
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise InvalidInputError(f"pgd expects images [B, C, H, W] and labels [B], got {list(x.shape)} and {list(y.shape)}")
    if n_iter < 1 or n_restarts < 1:
        raise InvalidInputError(f"pgd needs n_iter >= 1 and n_restarts >= 1, got {n_iter} and {n_restarts}")
    alpha = step_size if step_size is not None else default_step_size(eps, n_iter)
    x = x.detach()
    y = y.detach()

    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    robust = pred == y
    x_adv = x.clone()
    final_pred = pred.clone()

    def record(x_query: torch.Tensor, logits: torch.Tensor) -> None:
        query_pred = logits.detach().argmax(dim=1)
        broken_now = robust & ~answered_right(logits.detach(), y, rejecting)
        x_adv[broken_now] = x_query.detach()[broken_now]
        final_pred[broken_now] = query_pred[broken_now]
        robust.logical_and_(~broken_now)
        keep = robust
        final_pred[keep] = query_pred[keep]

    bar = tqdm(total=n_restarts * n_iter, desc="pgd", unit="step", leave=False, disable=not progress)
    for restart in range(n_restarts):
        generator = torch.Generator().manual_seed(seed * 1000 + restart)
        x_iter = ball.random_start(x, norm, eps, generator) if random_start else x.clone()
        for _ in range(n_iter):
            with torch.enable_grad():
                x_query = x_iter.requires_grad_(True)
                logits = model(x_query)
                (grad,) = torch.autograd.grad(objective(logits, y, loss, rejecting), [x_query])
            record(x_query, logits)
            with torch.no_grad():
                x_iter = ball.project(x, x_iter.detach() + ball.ascent_step(grad, norm, alpha), norm, eps)
            bar.update(1)
        with torch.no_grad():
            record(x_iter, model(x_iter))
        x_adv[robust] = x_iter[robust]
    bar.close()
    return PGDResult(x_adv=x_adv, robust=robust.clone(), pred=final_pred)


def run_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, point, *, device, seed: int, progress: bool = False):
    """The ``pgd`` attack runner (see :mod:`dent.attacks.registry`). It knows the reject class of a detector
    (:func:`~dent.defenses.detection.rejects`): a rejected adversarial input is defended."""
    from dent.attacks.registry import AttackOutcome

    n_iter = point.n_iter if point.n_iter is not None else DEFAULT_N_ITER
    rejecting = rejects(model)
    view = attack_view(model, point.eot_iter) if point.gradient is PGDGradient.DECLARED else PlainGradient(model)
    result = pgd(
        view, x, y, norm=point.norm, eps=point.eps, n_iter=n_iter, step_size=point.step_size,
        n_restarts=point.n_restarts or 1, random_start=point.random_start, loss=point.loss, rejecting=rejecting,
        seed=seed, progress=progress,
    )
    robust, pred = result.robust, result.pred
    notes = {"n_iter": n_iter, "step_size": point.step_size or default_step_size(point.eps, n_iter)}
    if point.gradient is PGDGradient.DECLARED:
        notes["view"] = describe_view(model, point.eot_iter)
        if traits_of(model).randomized:  # the queries were EOT means, not the defense's answers: ask it
            robust, pred = answered_by_the_defense(model, x, result.x_adv, y, rejecting)
    if rejecting:
        with torch.no_grad():
            notes["detection"] = detection_notes(model(result.x_adv))
    return AttackOutcome(robust={"pgd": robust.cpu()}, pred={"pgd": pred.cpu()}, notes=notes,
                         x_adv={"pgd": result.x_adv.detach().cpu()})


@torch.no_grad()
def answered_by_the_defense(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                            rejecting: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust, prediction) [B] from one query of ``model`` on the clean and one on the adversarial inputs: robust
    where the clean input is classified correctly (not rejected) and the adversarial one answered right."""
    clean_right = model(x).argmax(dim=1) == y
    logits = model(x_adv)
    return clean_right & answered_right(logits, y, rejecting), logits.argmax(dim=1)


#: The runner counts a detector's rejection as defended (the evaluation runner refuses other attacks on detectors).
run_pgd.reject_aware = True
