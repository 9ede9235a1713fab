"""Adversarial weight perturbation (AWP, Wu et al. 2020), an option of the adversarial recipes.

Each training step: the gradient of the recipe's loss (on its adversarial examples) with respect to the weights
of every convolution and linear layer gives a perturbation ``v_l = gamma * ||w_l|| * g_l / ||g_l||``, one
normalized ascent step per layer (the official code's proxy step, rescaled); the loss is recomputed at ``w + v``
on the same examples, the optimizer steps with that gradient, and ``v`` is removed again. The official code
perturbs the same parameters (those with more than one dimension: not biases, not BatchNorm).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

#: A weight perturbation: (parameter, the offset added to it).
Perturbation = list[tuple[nn.Parameter, torch.Tensor]]


def perturbed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights AWP moves: trainable parameters with more than one dimension (convolution and linear weights)."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def weight_perturbation(model: nn.Module, loss: torch.Tensor, gamma: float,
                        average: Callable[[list[Optional[torch.Tensor]]], list[Optional[torch.Tensor]]] = list,
                        ) -> Perturbation:
    """The perturbation that increases ``loss``: per layer, ``gamma`` times the weight's norm along its gradient.

    ``average`` turns the gradients into those of the whole batch; under torchrun, their mean over the ranks
    (:meth:`dent.training.distributed.World.average`), so every rank perturbs its weights alike.
    """
    params = perturbed_parameters(model)
    grads = average(list(torch.autograd.grad(loss, params, allow_unused=True)))
    out: Perturbation = []
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        norm = grad.norm()
        if norm > 0:
            out.append((param, gamma * param.detach().norm() * grad / norm))
    return out


@contextmanager
def perturbed(perturbation: Perturbation) -> Iterator[None]:
    """Add the perturbation to its parameters for the block, subtract it afterwards (also on errors). An
    optimizer step inside the block is kept: it is applied to ``w + v``, and ``v`` is removed from the result."""
    with torch.no_grad():
        for param, offset in perturbation:
            param.add_(offset)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, offset in perturbation:
                param.sub_(offset)


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalize with batch statistics as usual but leave their running statistics unchanged
    (momentum 0): the second forward pass of an AWP step must not update them a second time."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
