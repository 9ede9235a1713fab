"""Fast batched example generators for adversarial training: PGD, FGSM with random start, TRADES' KL attack.

All of them work on a batch at once, for the Linf and L2 threat models, draw their random starts from an
explicit ``torch.Generator`` (so training is reproducible and resumable bit-for-bit), differentiate only
with respect to the perturbation (model parameter ``.grad`` is never touched), and return detached
examples inside the epsilon ball around ``x`` and inside the [0, 1] box.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dent.attacks.ball import ascent_step, project, random_start
from dent.errors import InvalidInputError
from dent.threat import ThreatModel
from dent.training.config import BnMode

#: loss(logits) -> scalar to *maximize*.
AdvLoss = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def model_mode(model: nn.Module, mode: BnMode | str) -> Iterator[nn.Module]:
    """Put ``model`` in train or eval mode for the attack, and restore its previous mode afterwards."""
    was_training = model.training
    model.train(BnMode(mode) is BnMode.TRAIN)
    try:
        yield model
    finally:
        model.train(was_training)


def check_inputs(x: torch.Tensor, eps: float, step: float, steps: int) -> None:
    if x.dim() != 4:
        raise InvalidInputError(f"expected a batch of images [B, C, H, W], got shape {list(x.shape)}")
    if not eps > 0 or not step > 0 or steps < 1:
        raise InvalidInputError(f"expected eps > 0, step > 0 and steps >= 1, got eps={eps}, step={step}, steps={steps}")


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: AdvLoss,
    *,
    norm: ThreatModel | str,
    eps: float,
    step: float,
    steps: int,
    start: torch.Tensor | None = None,
    bn_mode: BnMode | str = BnMode.EVAL,
) -> torch.Tensor:
    """Projected gradient *ascent* on ``loss_fn(model(x_adv))`` from ``start`` (default ``x``)."""
    check_inputs(x, eps, step, steps)
    x = x.detach()
    x_adv = (x if start is None else start).detach().clone()
    with model_mode(model, bn_mode), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x, x_adv.detach() + ascent_step(grad, norm, step), norm, eps)
    return x_adv.detach()


def ce_loss(labels: torch.Tensor) -> AdvLoss:
    """Summed cross-entropy against ``labels`` (summed so the step does not depend on the batch size)."""
    return lambda logits: F.cross_entropy(logits, labels, reduction="sum")


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: ThreatModel | str = ThreatModel.LINF,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 10,
    random_init: bool = True,
    generator: torch.Generator | None = None,
    bn_mode: BnMode | str = BnMode.EVAL,
) -> torch.Tensor:
    """PGD on the cross-entropy against ``y`` (Madry et al. 2018), from a random start in the ball."""
    check_inputs(x, eps, step, steps)
    start = random_start(x, norm, eps, generator) if random_init else None
    return perturb(model, x, ce_loss(y), norm=norm, eps=eps, step=step, steps=steps, start=start, bn_mode=bn_mode)


def fgsm_rs_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: ThreatModel | str = ThreatModel.LINF,
    eps: float = 8 / 255,
    step_scale: float = 1.25,
    generator: torch.Generator | None = None,
    bn_mode: BnMode | str = BnMode.EVAL,
) -> torch.Tensor:
    """FGSM from a uniform random start with step ``step_scale * eps``, projected back (Wong et al. 2020)."""
    return pgd_examples(
        model, x, y, norm=norm, eps=eps, step=step_scale * eps, steps=1, random_init=True,
        generator=generator, bn_mode=bn_mode,
    )


def trades_examples(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: ThreatModel | str = ThreatModel.LINF,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 10,
    generator: torch.Generator | None = None,
    bn_mode: BnMode | str = BnMode.EVAL,
    init_std: float = 1e-3,
) -> torch.Tensor:
    """TRADES' inner maximization: KL(p(x) || p(x_adv)) from ``x + init_std * N(0, 1)`` (Zhang et al. 2019)."""
    check_inputs(x, eps, step, steps)
    with model_mode(model, bn_mode), torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    start = project(x, x + init_std * noise, norm, eps)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

    return perturb(model, x, kl, norm=norm, eps=eps, step=step, steps=steps, start=start, bn_mode=bn_mode)
