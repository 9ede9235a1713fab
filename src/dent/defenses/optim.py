"""Optimizers for the test-time updates, by name, and AdaMod (the published rule and the package's).

A factory ``(param_groups, config) -> torch.optim.Optimizer`` takes its hyper-parameters from the config;
groups may override ``lr`` (dent gives the blur width its own ``sigma_lr``).

Dent passes all BatchNorm scales and shifts of a dtype/device as *one* flat tensor (see
``dent.defenses.dent._Adaptation``), so an optimizer must act element-wise, as Adam, AdaMod and SGD do; a
rule that looks at whole tensors (e.g. a per-layer norm or trust ratio) would see one tensor, not one per layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from dent.registry import Registry

if TYPE_CHECKING:
    from dent.defenses.config import DentConfig

OptimizerFactory = Callable[[list[dict[str, Any]], "DentConfig"], Optimizer]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], config: DentConfig) -> Optimizer:
    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamod")
def adamod(groups: list[dict[str, Any]], config: DentConfig) -> Optimizer:
    return AdaMod(groups, lr=config.lr, betas=config.betas, beta3=config.beta3, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamod_official")
def adamod_official(groups: list[dict[str, Any]], config: DentConfig) -> Optimizer:
    """The ``adamod`` package's rule (:class:`PackageAdaMod`), as the official dent+ code uses it."""
    return PackageAdaMod(groups, lr=config.lr, betas=config.betas, beta3=config.beta3,
                         weight_decay=config.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], config: DentConfig) -> Optimizer:
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class AdaMod(Optimizer):
    """AdaMod (Ding et al., 2019, "An Adaptive and Momental Bound Method for Stochastic Learning").

    Adam whose element-wise step sizes are capped by their own exponential moving average, which damps the
    large steps Adam takes while its second-moment estimate is still small. Per element, at step t::

        m = b1 m + (1 - b1) g        v = b2 v + (1 - b2) g^2       (g includes weight_decay * p)
        m_hat = m / (1 - b1^t)       v_hat = v / (1 - b2^t)
        eta = lr / (sqrt(v_hat) + eps)
        s = b3 s + (1 - b3) eta      (s starts at 0)
        p = p - min(eta, s) * m_hat

    This is the published rule (Algorithm 1). The authors' package, which the official dent code uses, is
    :class:`PackageAdaMod`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        name = type(self).__name__
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"{name} needs lr > 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0 <= b < 1 for b in (*betas, beta3)):
            raise ValueError(f"{name} needs betas and beta3 in [0, 1) (got {betas}, {beta3})")
        super().__init__(params, dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                grad = self._decayed_gradient(p, group)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step_size_avg"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq, step_size_avg = state["exp_avg"], state["exp_avg_sq"], state["step_size_avg"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = self._step_size(exp_avg_sq, t, group)
                step_size_avg.mul_(group["beta3"]).add_(step_size, alpha=1 - group["beta3"])
                torch.minimum(step_size, step_size_avg, out=step_size)
                p.sub_(step_size.mul_(exp_avg).div_(self._momentum_correction(t, beta1)))
        return loss

    def _decayed_gradient(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The gradient the moments average: weight decay enters as an L2 term."""
        return p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad

    def _step_size(self, exp_avg_sq: torch.Tensor, t: int, group: dict[str, Any]) -> torch.Tensor:
        """A new tensor of the element-wise step sizes that the momental bound averages (eta)."""
        _, beta2 = group["betas"]
        return (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"]).reciprocal_().mul_(group["lr"])

    def _momentum_correction(self, t: int, beta1: float) -> float:
        """What the bounded step divides the first moment by: its bias correction."""
        return 1 - beta1**t


class PackageAdaMod(AdaMod):
    """AdaMod as the authors' ``adamod`` package (0.0.3) computes it, which the official dent code uses.

    Two differences from the published rule (:class:`AdaMod`):

    * the bias corrections are folded into one scalar step size, outside the square root and ``eps``:
      ``eta = lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)``, applied to ``m`` (not ``m_hat``); so the
      bound ``s`` averages bias-corrected step sizes and early steps are larger than the rule's;
    * weight decay is decoupled (AdamW-style): ``p = p - weight_decay * lr * p`` before the update, and the
      moments see the bare gradient.

    The package itself still runs on torch 2.13 (with deprecation warnings for its ``add_(scalar, tensor)``
    calls); this class is its arithmetic, tested against it (tests/test_defense_optim.py).
    """

    def _decayed_gradient(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if group["weight_decay"]:
            p.mul_(1 - group["weight_decay"] * group["lr"])
        return p.grad

    def _step_size(self, exp_avg_sq: torch.Tensor, t: int, group: dict[str, Any]) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        scale = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        return exp_avg_sq.sqrt().add_(group["eps"]).reciprocal_().mul_(scale)

    def _momentum_correction(self, t: int, beta1: float) -> float:
        return 1.0  # folded into the step size
