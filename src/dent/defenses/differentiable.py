"""Dent made differentiable through its adaptation: the input gradient of an attack that sees the updates.

:class:`~dent.defenses.Dent` adapts on a *detached* copy of its input, so an attacker's gradient only
flows through the final prediction (the paper's protocol). :class:`DifferentiableDent` computes the same
prediction, but as a differentiable function of the input *through all K adaptation steps*: every step's
gradient of the test-time objective is taken with ``create_graph=True`` and the optimizer update is a pure
function of (parameters, gradients, optimizer state), so the adapted BatchNorm affine parameters (Delta)
and blur width (Sigma) are functions of the input and backpropagation differentiates the updates
(second-order terms included).

It reuses the wrapped :class:`Dent`'s building blocks (its model preparation, BatchNorm stand-ins, blur,
objective, initial values and optimizer hyper-parameters); only the update rule is re-expressed here, as
functional versions of :class:`torch.optim.Adam`, :class:`~dent.defenses.optim.AdaMod` (and its
:class:`~dent.defenses.optim.PackageAdaMod` variant) and
:class:`torch.optim.SGD` that perform the same arithmetic as the in-place ones. Its forward output equals
Dent's (same config) up to float rounding.

Exactness at ``sqrt(0)``: Adam and AdaMod divide by ``sqrt(v_hat) + eps``. Where an element's gradients have
all been exactly 0 so far, ``v = 0`` and autograd's ``d sqrt(v)/dv`` is infinite (``inf * 0 = NaN``). Here
the square root's derivative is taken as 0 at ``v = 0``. This is exact, not an approximation: as a function
of the gradient ``g``, ``sqrt(v)`` is ``|g|`` (times a constant) near such a point, and the update
``m / (sqrt(v) + eps)`` has derivative ``1/eps`` there, which is what the rule gives (the ``|g|`` term's
contribution is multiplied by ``m = 0``). No epsilon is added anywhere; forward values are unchanged.

Memory grows with the number of differentiated steps (each keeps a forward and a backward graph of the
model). Two remedies, recorded by :meth:`DifferentiableDent.describe`:

* ``horizon=T``: truncated backpropagation; only the last ``T`` steps are differentiated, the earlier ones
  run detached (their result is a constant of the attack gradient). ``T = 0`` is Dent's own gradient.
* ``checkpoint=True``: each differentiated step is recomputed during the backward pass
  (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant) instead of keeping its graph; the gradient is
  unchanged, memory is about one step's graph plus the small per-step parameters, time about 1.5-1.8x.

Measured on CPU (1 thread; best of 2-3; one APGD iteration = one such query), ResNet-26 width 1, batch 16,
32x32: K=10 steps, gradient of the final prediction only (Dent) 1.3 s / +140 MB peak; through all 10 steps
3.8 s / +900 MB; checkpointed 6.7 s / +340 MB; last 2 steps only 1.8 s / +290 MB.

The blur (Sigma) uses a kernel of 2*ceil(3 sigma)+1 taps, a step function of sigma: where an update moves
sigma across such a step, the defense is discontinuous in its input and the gradient is the one-sided one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

from dent.defenses.config import AffineMode, InputMode, SampleGrad
from dent.defenses.dent import Dent
from dent.defenses.optim import AdaMod, PackageAdaMod
from dent.errors import InvalidInputError


def safe_sqrt(v: Tensor) -> Tensor:
    """``v.sqrt()`` with the derivative at exactly 0 taken as 0 (see the module docstring)."""
    positive = v > 0
    # Double-where: the sqrt of a substitute 1 where v == 0, so no inf enters the graph at any order.
    root = torch.where(positive, v, torch.ones_like(v)).sqrt()
    return torch.where(positive, root, torch.zeros_like(v))


# -- functional optimizer updates ------------------------------------------------------------------
# Each rule: init(p) -> state tuple; update(p, g, state, t, group) -> (new p, new state). ``t`` is the
# 1-based step number; ``group`` is the hyper-parameter dict of the torch optimizer's param group.


@dataclass(frozen=True)
class FunctionalRule:
    name: str
    init: Callable[[Tensor], tuple[Tensor, ...]]
    update: Callable[[Tensor, Tensor, tuple[Tensor, ...], int, dict[str, Any]], tuple[Tensor, tuple[Tensor, ...]]]


def _adam_init(p: Tensor) -> tuple[Tensor, ...]:
    return (torch.zeros_like(p), torch.zeros_like(p))


def _adam_update(p, g, state, t, group):
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state
    if group["weight_decay"]:
        g = g.add(p, alpha=group["weight_decay"])
    exp_avg = torch.lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
    step_size = group["lr"] / (1 - beta1**t)
    denom = (safe_sqrt(exp_avg_sq) / (1 - beta2**t) ** 0.5).add(group["eps"])
    return p.addcdiv(exp_avg, denom, value=-step_size), (exp_avg, exp_avg_sq)


def _adamod_init(p: Tensor) -> tuple[Tensor, ...]:
    return (torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p))


def _adamod_update(p, g, state, t, group, folded: bool = False):
    """AdaMod's published rule, or (``folded``) the ``adamod`` package's (see :class:`PackageAdaMod`)."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq, step_size_avg = state
    if group["weight_decay"]:
        if folded:
            p = p.mul(1 - group["weight_decay"] * group["lr"])
        else:
            g = g.add(p, alpha=group["weight_decay"])
    exp_avg = torch.lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
    if folded:
        step_size = safe_sqrt(exp_avg_sq).add(group["eps"]).reciprocal().mul(
            group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t))
        momentum_correction = 1.0
    else:
        step_size = safe_sqrt(exp_avg_sq / (1 - beta2**t)).add(group["eps"]).reciprocal().mul(group["lr"])
        momentum_correction = 1 - beta1**t
    step_size_avg = step_size_avg.mul(group["beta3"]).add(step_size, alpha=1 - group["beta3"])
    step_size = torch.minimum(step_size, step_size_avg)
    return p.sub(step_size.mul(exp_avg).div(momentum_correction)), (exp_avg, exp_avg_sq, step_size_avg)


def _sgd_init(p: Tensor) -> tuple[Tensor, ...]:
    return (torch.zeros_like(p),)


def _sgd_update(p, g, state, t, group):
    if group["weight_decay"]:
        g = g.add(p, alpha=group["weight_decay"])
    (buf,) = state
    if group["momentum"]:
        # torch.optim.SGD: the buffer starts as the first gradient, then buf = momentum buf + (1 - dampening) g.
        buf = g if t == 1 else buf.mul(group["momentum"]).add(g, alpha=1 - group["dampening"])
        g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    return p.add(g, alpha=-group["lr"]), (buf,)


ADAM = FunctionalRule("adam", _adam_init, _adam_update)
ADAMOD = FunctionalRule("adamod", _adamod_init, _adamod_update)
PACKAGE_ADAMOD = FunctionalRule("adamod_official", _adamod_init, partial(_adamod_update, folded=True))
SGD = FunctionalRule("sgd", _sgd_init, _sgd_update)


def functional_rule(optimizer: torch.optim.Optimizer) -> FunctionalRule:
    """The functional update that performs the same arithmetic as ``optimizer``'s ``step``."""
    groups = optimizer.param_groups
    unsupported = [key for key in ("maximize", "amsgrad", "decoupled_weight_decay")
                   if any(group.get(key) for group in groups)]
    # Exact type checks: a subclass may change the rule.
    if type(optimizer) is torch.optim.Adam and not unsupported:
        return ADAM
    if type(optimizer) is AdaMod and not unsupported:
        return ADAMOD
    if type(optimizer) is PackageAdaMod and not unsupported:
        return PACKAGE_ADAMOD
    if type(optimizer) is torch.optim.SGD and not unsupported:
        return SGD
    extra = f" with {', '.join(unsupported)}" if unsupported else ""
    raise InvalidInputError(
        f"no differentiable version of the test-time optimizer {type(optimizer).__name__}{extra}; "
        "differentiating through the adaptation supports Adam, AdaMod (both rules) and SGD "
        "(optimizer: adam | adamod | adamod_official | sgd)"
    )


# -- the differentiable defense --------------------------------------------------------------------


class DifferentiableDent(nn.Module):
    """``dent``'s prediction as a function of the input that is differentiable through the adaptation.

    Called like ``dent`` on images [B, C, H, W] in [0, 1]; returns the same logits (up to rounding).
    When grad is enabled and the input requires grad, the last ``horizon`` adaptation steps (all of them
    by default) are differentiated; otherwise the call is a plain (non-differentiated) adaptation.

    ``checkpoint=True`` recomputes each differentiated step in the backward pass instead of storing it.
    Only episodic defenses are supported (each call adapts from the initial state).
    """

    def __init__(self, dent: Dent, *, horizon: int | None = None, checkpoint: bool = False):
        super().__init__()
        if not isinstance(dent, Dent):
            raise InvalidInputError(f"DifferentiableDent wraps a dent.defenses.Dent, got {type(dent).__name__}")
        if not dent.config.episodic:
            raise InvalidInputError("differentiating through the adaptation needs an episodic defense (episodic=True)")
        if horizon is not None and horizon < 0:
            raise InvalidInputError(f"horizon must be >= 0 (or None for all steps), got {horizon}")
        self.dent = dent
        self.horizon = horizon
        self.checkpoint = checkpoint

    # what is differentiated, for result records
    @property
    def steps(self) -> int:
        return self.dent.config.steps

    @property
    def learns(self) -> bool:
        return bool(self.dent._adapted_norms) or self.dent._learns_sigma

    @property
    def differentiated_steps(self) -> int:
        if not self.learns:
            return 0
        return self.steps if self.horizon is None else min(self.horizon, self.steps)

    def describe(self) -> dict[str, Any]:
        """How the gradient is computed: steps, differentiated steps, truncation and checkpointing."""
        k = self.differentiated_steps
        return {
            "steps": self.steps,
            "differentiated_steps": k,
            "horizon": self.horizon,
            "truncated": k < self.steps and self.learns,
            "checkpoint": bool(self.checkpoint),
            "optimizer": self.dent.config.optimizer,
        }

    def forward(self, x: Tensor) -> Tensor:
        dent = self.dent
        dent._check(x)
        if not self.learns:
            return dent(x)  # nothing adapts: Dent's plain forward is already differentiable
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._forward(x.clone(), differentiate=False)
        return self._forward(x, differentiate=torch.is_grad_enabled() and x.requires_grad)

    # -- internals ------------------------------------------------------------------------------
    def _initial(self, x: Tensor) -> list[Tensor]:
        """Fresh initial values of the learned tensors, in the optimizer's order: affine (w, b)..., raw sigma."""
        dent, cfg = self.dent, self.dent.config
        params = []
        for norm in dent._adapted_norms:
            for source in (norm.weight, norm.bias):
                value = source.detach()
                if cfg.affine is AffineMode.SAMPLE:
                    value = value.expand(len(x), -1)
                params.append(value.clone())
        if dent._learns_sigma:
            shape = (len(x),) if cfg.input is InputMode.SAMPLE else (1,)
            params.append(torch.full(shape, dent._raw_sigma_init, dtype=x.dtype, device=x.device))
        return params

    def _static_sigma(self, x: Tensor) -> Tensor | None:
        dent = self.dent
        if dent.config.input is InputMode.NONE or dent._learns_sigma:
            return None
        raw = torch.full((1,), dent._raw_sigma_init, dtype=x.dtype, device=x.device)
        return torch.nn.functional.softplus(raw)

    def _split(self, params: list[Tensor], x: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        n_affine = 2 * len(self.dent._adapted_norms)
        affine = [(params[i], params[i + 1]) for i in range(0, n_affine, 2)]
        if self.dent._learns_sigma:
            sigma = torch.nn.functional.softplus(params[n_affine])
        else:
            sigma = self._static_sigma(x)
        return affine, sigma

    def _hyper(self, params: list[Tensor]) -> tuple[FunctionalRule, list[dict[str, Any]]]:
        """The update rule and each tensor's hyper-parameters, read off the optimizer dent would build."""
        dent, cfg = self.dent, self.dent.config
        n_affine = 2 * len(dent._adapted_norms)
        groups = []
        if n_affine:
            groups.append({"params": [p.detach() for p in params[:n_affine]]})
        if dent._learns_sigma:
            groups.append({"params": [params[n_affine].detach()], "lr": cfg.sigma_lr})
        optimizer = dent.make_optimizer(groups, cfg)
        rule = functional_rule(optimizer)
        per_tensor = []
        for group in optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            per_tensor += [hyper] * len(group["params"])
        return rule, per_tensor

    def _per_input_mask(self, params: list[Tensor]) -> list[bool]:
        """Which tensors get their gradient scaled by the batch size: per-input ones, with sample_grad='own_term'."""
        cfg = self.dent.config
        scaled = cfg.sample_grad is SampleGrad.OWN_TERM
        n_affine = 2 * len(self.dent._adapted_norms)
        mask = [scaled and cfg.affine is AffineMode.SAMPLE] * n_affine
        if self.dent._learns_sigma:
            mask.append(scaled and cfg.input is InputMode.SAMPLE)
        return mask

    def _step_fn(self, t: int, rule: FunctionalRule, hyper: list[dict[str, Any]], per_input: list[bool],
                 n: int, create_graph: bool) -> Callable[..., tuple[Tensor, ...]]:
        """One adaptation step as a pure function of (x, *params, *state) -> (*params, *state)."""
        dent = self.dent
        n_state = len(rule.init(torch.zeros(1)))

        def step(x: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
            params = list(flat[:n])
            states = [tuple(flat[n + i * n_state: n + (i + 1) * n_state]) for i in range(n)]
            with torch.enable_grad():
                if not create_graph:
                    params = [p.detach().requires_grad_(True) for p in params]
                else:
                    params = [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
                with dent._model_prepared():
                    affine, sigma = self._split(params, x)
                    loss = dent._step_loss(x, affine, sigma)
                grads = torch.autograd.grad(loss, params, create_graph=create_graph)
            out_params, out_states = [], []
            for p, g, state, group, scaled in zip(params, grads, states, hyper, per_input):
                if scaled:
                    g = g * len(x)
                new_p, new_state = rule.update(p, g, state, t, group)
                out_params.append(new_p)
                out_states.extend(new_state)
            result = tuple(out_params) + tuple(out_states)
            if not create_graph:
                result = tuple(r.detach() for r in result)
            return result

        return step

    def _forward(self, x: Tensor, differentiate: bool) -> Tensor:
        dent = self.dent
        params = self._initial(x)
        rule, hyper = self._hyper(params)
        per_input = self._per_input_mask(params)
        states: list[Tensor] = [s for p in params for s in rule.init(p)]
        n = len(params)
        steps = self.steps
        tracked_from = steps - self.differentiated_steps if differentiate else steps
        for k in range(steps):
            tracked = k >= tracked_from
            step = self._step_fn(k + 1, rule, hyper, per_input, n, create_graph=tracked)
            inputs = x if tracked else x.detach()
            if tracked and self.checkpoint:
                out = checkpoint_call(step, inputs, *params, *states, use_reentrant=False)
            else:
                out = step(inputs, *params, *states)
            params, states = list(out[:n]), list(out[n:])
        if not differentiate:
            params = [p.detach() for p in params]
        with dent._model_prepared():
            affine, sigma = self._split(params, x)
            return dent._predict(x, affine, sigma)


def shortened(dent: Dent, steps: int) -> Dent:
    """A copy of the defense ``dent`` that takes ``steps`` adaptation steps (same model, same settings)."""
    if steps < 1:
        raise InvalidInputError(f"a shortened defense needs at least 1 step, got {steps}")
    return Dent(dent.model, dent.config.replace(steps=steps))
