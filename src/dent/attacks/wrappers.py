"""Generic BPDA and EOT (Athalye, Carlini, Wagner 2018), driven by a defense's declared traits.

:func:`attack_view` is the model a gradient attack should differentiate for a defense, decided by its
declarations (:mod:`dent.defenses.protocol`) and never by its kind: BPDA (the defense's answers, the
gradient of its ``bpda_surrogate()``) if it declares ``differentiable = False``, and, if it declares
``randomized = True``, :class:`EOT` (logits averaged over draws). Both are plain ``nn.Module`` s, so they
work with pyautoattack's APGD, :func:`dent.attacks.apgd_batch.apgd_batch`, AutoAttack and PGD alike.
Attacks still judge success on the defense's own answers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dent.defenses.protocol import bpda_surrogate, inherit_traits, traits_of
from dent.errors import InvalidInputError

#: EOT draws of :func:`attack_view` for a randomized defense when the attack does not set ``eot_iter``.
DEFAULT_EOT_SAMPLES = 8


class BPDA(nn.Module):
    """Forward: the defense's answer. Backward: the gradient of ``approximation`` at a noisy copy of the input.

    ``approximation`` defaults to the defense's declared surrogate. ``noise`` is the std of Gaussian noise
    added (then clipped to [0, 1]) for each call, so that repeated calls average the gradient over noise
    draws. A deterministic defense's answer is cached for the last input (attacks query the same input with
    and without grad); a randomized one is called every time.
    """

    def __init__(self, defense: nn.Module, approximation: nn.Module | None = None, noise: float = 0.0):
        super().__init__()
        self.defense = defense
        self.approximation = bpda_surrogate(defense) if approximation is None else approximation
        self.noise = noise
        self.randomized = traits_of(defense).randomized
        self._cache: tuple[Tensor, Tensor] | None = None

    def _value(self, x: Tensor) -> Tensor:
        cache = self._cache
        if not self.randomized and cache is not None and cache[0].shape == x.shape and torch.equal(cache[0], x):
            return cache[1]
        with torch.no_grad():
            value = self.defense(x)
        if not self.randomized:
            self._cache = (x.clone(), value)
        return value

    def forward(self, x: Tensor) -> Tensor:
        value = self._value(x.detach())
        if not (torch.is_grad_enabled() and x.requires_grad):
            return value
        noisy = x if not self.noise else (x + self.noise * torch.randn_like(x)).clamp(0, 1)
        approx = self.approximation(noisy)
        return value + (approx - approx.detach())  # exactly the defense's answer, the approximation's gradient


class PlainGradient(nn.Module):
    """The defense as an attack on its own gradient sees it: its answers, and a zero gradient where autograd
    has none (answers computed outside autograd, e.g. by a codec) instead of an autograd error. The attack
    then fails there, as it would on any masked gradient, and the report's gradient check says why. The
    added zero is exact: answers and existing gradients are unchanged."""

    def __init__(self, defense: nn.Module):
        super().__init__()
        self.defense = defense
        inherit_traits(self, defense)

    def forward(self, x: Tensor) -> Tensor:
        out = self.defense(x)
        if torch.is_grad_enabled() and x.requires_grad:
            out = out + 0.0 * x.sum()
        return out


class EOT(nn.Module):
    """The mean of ``model``'s logits over ``samples`` calls: the expectation over a randomized defense's
    draws, and its gradient the mean of the draws' gradients."""

    def __init__(self, model: nn.Module, samples: int):
        super().__init__()
        if samples < 1:
            raise InvalidInputError(f"EOT needs at least 1 sample, got {samples}")
        self.model = model
        self.samples = samples

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(dim=0)


def gradient_view(defense: nn.Module) -> nn.Module:
    """``defense`` itself (its :class:`PlainGradient`) if it declares a useful gradient, else its :class:`BPDA`."""
    return PlainGradient(defense) if traits_of(defense).differentiable else BPDA(defense)


def eot_draws(defense: nn.Module, requested: int | None) -> int:
    """How many draws a gradient averages over: ``requested``, else :data:`DEFAULT_EOT_SAMPLES` for a
    randomized defense and 1 for a deterministic one."""
    return requested or (DEFAULT_EOT_SAMPLES if traits_of(defense).randomized else 1)


def attack_view(defense: nn.Module, eot_samples: int | None = None) -> nn.Module:
    """What a gradient attack without EOT of its own differentiates for ``defense``: :func:`gradient_view`,
    wrapped in :class:`EOT` over :func:`eot_draws` draws if it is randomized. (APGD has EOT built in:
    give it :func:`gradient_view` and ``eot_iter=eot_draws(...)`` instead.)"""
    view = gradient_view(defense)
    return EOT(view, eot_draws(defense, eot_samples)) if traits_of(defense).randomized else view


def describe_view(defense: nn.Module, eot_samples: int | None = None) -> dict[str, Any]:
    """What :func:`attack_view` did, for a unit's notes."""
    traits = traits_of(defense)
    return {"traits": traits.to_dict(), "bpda": not traits.differentiable, "eot_samples": eot_draws(defense, eot_samples)}


# -- the attack runner ------------------------------------------------------------------------------

#: The APGD variants :func:`run_declared_apgd` runs, and its budget when the attack point does not set one.
DECLARED_SUB_ATTACKS = ("apgd-ce", "apgd-t")
DECLARED_BUDGET = {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}


def run_declared_apgd(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int,
                      progress: bool = False):
    """APGD-CE and APGD-T on the whole batch with the gradient the defense's declarations call for.

    BPDA through its surrogate if it is not differentiable; gradients averaged over ``attack.eot_iter``
    draws (APGD's EOT; default :data:`DEFAULT_EOT_SAMPLES`) if it is randomized. A point is robust if every
    query and the defense's answer on the final input classify it correctly. Labels are the APGD variants.
    """
    from dent.attacks.apgd_batch import apgd_batch
    from dent.attacks.registry import AttackOutcome

    attacked = gradient_view(model)
    eot = eot_draws(model, point.eot_iter)
    budget = {key: getattr(point, key) or default for key, default in DECLARED_BUDGET.items()}
    robust, pred, inputs = {}, {}, {}
    for sub in DECLARED_SUB_ATTACKS:
        res = apgd_batch(attacked, x, y, attack=sub, norm=point.norm, eps=point.eps, seed=seed, eot_iter=eot,
                         **budget)
        inputs[sub] = res.x_adv.detach().cpu()
        with torch.no_grad():
            pred[sub] = model(res.x_adv).argmax(dim=1)
        robust[sub] = res.robust & (pred[sub] == y)
    notes = {"view": describe_view(model, point.eot_iter), "budget": {**budget, "eot_iter": eot}}
    return AttackOutcome(robust={k: v.cpu() for k, v in robust.items()},
                         pred={k: v.cpu() for k, v in pred.items()}, notes=notes, x_adv=inputs)
