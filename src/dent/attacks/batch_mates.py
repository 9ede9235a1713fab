"""The batch-mates attack: malicious inputs added to a batch flip the benign inputs' answers through the adaptation.

A batch-wise test-time defense answers each input with parameters adapted on the whole batch, so whoever
controls some inputs of a batch controls part of what answers the others (Wu et al., ICML 2023, "distribution
invading attack"). Here the attacker adds ``k`` inputs to each evaluation batch of ``n`` benign ones (the
defense adapts on ``n + k``) and optimizes them, by signed-gradient ascent differentiated through the
adaptation steps (:class:`~dent.defenses.differentiable.DifferentiableDent`), to maximize the cross-entropy of
the defense's answers on the benign inputs. The benign inputs are never perturbed.

Threat model of the malicious inputs: in a shared service nothing constrains a stranger's request, so by
default they are any images in [0, 1], starting from uniform noise; with ``adaptive.batch_mates_eps`` they stay
within that Linf distance of natural images of the batch (copies of its benign inputs, in order), starting from
a uniform point of that ball. The step is PGD's rule of thumb, 2.5 * radius / ``attack.n_iter`` (radius 1 when
unconstrained).

The attack keeps the malicious inputs of the best candidate batch (fewest benign inputs answered right, then
the largest benign cross-entropy). The reported answers are the defense's own on that batch, submitted once
more: a benign point is robust iff the defense answers it right beside the best malicious inputs. A sample-wise
defense (``DentConfig.batch_couplings()`` empty, or the static model) answers the benign inputs as it would
alone, whatever the malicious ones are: the attack's gradient is then exactly zero, and the attack stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.attacks.adaptive import _adaptive, _dent_of, _done
from dent.attacks.adaptive_config import DEFAULT_N_ITER
from dent.attacks.ball import ascent_step, project, random_start
from dent.attacks.pgd import default_step_size
from dent.defenses.differentiable import DifferentiableDent
from dent.defenses.protocol import traits_of
from dent.threat import ThreatModel

#: The malicious inputs' Linf radius when they are unconstrained: the whole [0, 1] box around any image.
UNCONSTRAINED = 1.0


@dataclass
class MatesResult:
    """One count of malicious inputs on one batch: the best malicious inputs found and the defense's answers."""

    malicious: Tensor  # [k, C, H, W], in [0, 1]
    pred: Tensor  # the defense's answers on the benign inputs, submitted beside ``malicious``
    best_correct: list[int]  # benign inputs answered right in the best candidate so far, after each candidate
    zero_gradient: bool  # stopped on an exactly zero gradient (a sample-wise defense: at the first step)


def mates_label(k: int, n: int) -> str:
    """``batch mates 4/20``: ``k`` malicious inputs in a batch of ``n`` benign ones plus them."""
    return f"batch mates {k}/{n + k}"


def submit(defense: nn.Module, x: Tensor, malicious: Tensor) -> Tensor:
    """The defense's logits for the benign inputs ``x``, answered in one batch with ``malicious`` after them."""
    return defense(torch.cat([x, malicious]))[: len(x)]


def _radius(eps: float | None) -> float:
    return UNCONSTRAINED if eps is None else eps


def _centers(x: Tensor, k: int) -> Tensor:
    """The natural images the bounded malicious inputs stay near: the batch's benign inputs, in order, cycled."""
    return x[torch.arange(k, device=x.device) % len(x)]


def _start(centers: Tensor, eps: float | None, generator: torch.Generator) -> Tensor:
    if eps is None:
        return torch.rand(centers.shape, generator=generator, dtype=centers.dtype).to(centers.device)
    return random_start(centers, ThreatModel.LINF, eps, generator)


def _better(correct: int, loss: float, best: tuple[int, float] | None) -> bool:
    return best is None or (correct, -loss) < (best[0], -best[1])


def attack_mates(defense: nn.Module, attacked: nn.Module, x: Tensor, y: Tensor, k: int, *, n_iter: int,
                 eps: float | None, seed: int) -> MatesResult:
    """Optimize ``k`` malicious batch-mates of the benign batch ``x`` for ``n_iter`` signed-gradient steps.

    ``attacked`` is the defense differentiable through its adaptation (its answers are the defense's, up to
    float rounding); it scores every candidate. ``defense`` answers the best candidate batch, once more.
    An exactly zero gradient ends the attack early unless the defense is randomized: the sign step would
    leave the iterate where it is, so every later candidate would be this same batch.
    """
    radius = _radius(eps)
    step = default_step_size(radius, n_iter)
    centers = _centers(x, k)
    malicious = _start(centers, eps, torch.Generator().manual_seed(seed + k))
    deterministic = not traits_of(defense).randomized
    best, best_malicious, best_correct, stopped = None, malicious, [], False
    for it in range(n_iter + 1):
        ascend = it < n_iter
        candidate = malicious.detach().requires_grad_(ascend)
        with torch.set_grad_enabled(ascend):
            logits = submit(attacked, x, candidate)
            loss = F.cross_entropy(logits, y, reduction="sum")
        correct, value = int((logits.argmax(1) == y).sum()), float(loss.detach())
        if _better(correct, value, best):
            best, best_malicious = (correct, value), candidate.detach().clone()
        best_correct.append(best[0])
        if ascend:
            (grad,) = torch.autograd.grad(loss, candidate)
            if deterministic and not grad.any():
                stopped = True
                break
            malicious = project(centers, candidate.detach() + ascent_step(grad, ThreatModel.LINF, step),
                                ThreatModel.LINF, radius)
    with torch.no_grad():
        pred = submit(defense, x, best_malicious).argmax(1)
    return MatesResult(best_malicious, pred, best_correct, stopped)


def run_batch_mates(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int,
                    progress: bool = False):
    """For each count k in ``adaptive.batch_mates`` (label ``batch mates k/(n+k)``), k malicious inputs added to
    the batch, optimized through the adaptation against the benign inputs; per benign point, whether the
    defense answered it right beside the best malicious inputs. ``x_adv`` is the benign input itself. Labels
    name the batch, so a smaller last evaluation batch gets labels of its own."""
    dent, rewrap = _dent_of(model, "batch_mates")
    adaptive = _adaptive(point)
    differentiable = DifferentiableDent(dent, checkpoint=adaptive.checkpoint)
    attacked = rewrap(differentiable)
    n_iter = point.n_iter or DEFAULT_N_ITER
    eps = adaptive.batch_mates_eps
    robust, pred, inputs, share, best_correct, stopped, seconds = {}, {}, {}, {}, {}, {}, {}
    for k in adaptive.batch_mates:
        label = mates_label(k, len(x))
        t0 = time.perf_counter()
        res = attack_mates(model, attacked, x, y, k, n_iter=n_iter, eps=eps, seed=seed)
        seconds[label] = round(time.perf_counter() - t0, 3)
        robust[label], pred[label], inputs[label] = res.pred == y, res.pred, x
        share[label] = [k, len(x) + k]
        best_correct[label], stopped[label] = res.best_correct, res.zero_gradient
    notes = {
        "malicious": {"eps": eps, "start": "uniform noise" if eps is None else "uniform in the ball around benign inputs",
                      "n_iter": n_iter, "step_size": default_step_size(_radius(eps), n_iter),
                      "objective": "sum of the benign inputs' cross-entropy"},
        "malicious_share": share,  # label -> [k, batch the defense adapted on]
        "best_benign_correct": best_correct,  # label -> best-so-far benign answers right, per candidate
        "zero_gradient": stopped,  # label -> stopped on an exactly zero gradient (sample-wise defenses)
        "gradient": differentiable.describe(),
        "benign": "unperturbed; answered beside the best malicious inputs (x_adv is the benign input)",
        "seconds": seconds,
    }
    return _done(robust, pred, notes, inputs)
