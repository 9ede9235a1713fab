"""The naive reference: dent written the straightforward way, timed beside :class:`~dent.defenses.Dent`.

Same semantics as ``Dent`` (same objective, optimizer, per-input gradients (``sample_grad``), initial values and
statistics), so its outputs match up to float rounding; but every call pays what a first implementation
typically pays:

* a deep copy of the whole model (weights, buffers, modules) per call, so nothing needs restoring;
* fresh ``nn.Parameter`` tensors and a fresh optimizer per call;
* every weight of the copy keeps ``requires_grad=True``, so each backward pass also computes the
  convolution and linear weight gradients (which nothing uses);
* ``loss.backward(retain_graph=True)``, so each step's graph buffers are kept until the next step's
  loss replaces them;
* one ``nn.Module`` per BatchNorm holding its own parameters (two optimizer tensors per layer).

Per-input (sample-wise) affine parameters are applied by broadcasting over [B, C, 1, 1], as dent+ is
usually written; a per-input Python loop would be slower still and is not what is measured.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.defenses.bn import BATCH_NORMS
from dent.defenses.blur import gaussian_blur
from dent.defenses.config import AffineMode, DentConfig, InputMode, SampleGrad, StatsMode
from dent.defenses.objectives import OBJECTIVES
from dent.defenses.optim import OPTIMIZERS


class _NaiveNorm(nn.Module):
    """A copied BatchNorm with its own affine parameters: [C], or [B, C] with ``per_input=B``."""

    def __init__(self, norm: nn.Module, per_input: int | None, batch_stats: bool, adapted: bool):
        super().__init__()
        self.norm = norm
        self.batch_stats = batch_stats or norm.running_mean is None
        self.weight = self.bias = None
        if norm.weight is not None:
            weight, bias = norm.weight.detach(), norm.bias.detach()
            if per_input is not None:
                weight, bias = weight.expand(per_input, -1), bias.expand(per_input, -1)
            self.weight = nn.Parameter(weight.clone(), requires_grad=adapted)
            self.bias = nn.Parameter(bias.clone(), requires_grad=adapted)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        mean, var = (None, None) if self.batch_stats else (norm.running_mean, norm.running_var)
        if self.weight is None or self.weight.dim() == 1:
            return F.batch_norm(x, mean, var, self.weight, self.bias, self.batch_stats, 0.0, norm.eps)
        normalized = F.batch_norm(x, mean, var, None, None, self.batch_stats, 0.0, norm.eps)
        shape = self.weight.shape + (1,) * (x.dim() - 2)
        return normalized * self.weight.view(shape) + self.bias.view(shape)


class NaiveDent(nn.Module):
    """Dent's computation without any of its care for speed (see the module docstring). Reference only."""

    def __init__(self, model: nn.Module, config: DentConfig = DentConfig()):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        model = copy.deepcopy(self.model).eval()  # a fresh copy per call: nothing to restore afterwards
        per_input = len(x) if cfg.affine is AffineMode.SAMPLE else None
        own_term = cfg.sample_grad is SampleGrad.OWN_TERM  # per-input gradients scaled by the batch size
        learns = cfg.steps > 0
        params, replaced = [], {}
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if not isinstance(child, BATCH_NORMS):
                    continue
                if child not in replaced:  # a norm registered twice stays shared
                    adapted = learns and cfg.affine is not AffineMode.NONE and child.weight is not None
                    if adapted or cfg.stats is StatsMode.BATCH:
                        norm = _NaiveNorm(child, per_input if adapted else None, cfg.stats is StatsMode.BATCH, adapted)
                        if adapted:
                            params += [norm.weight, norm.bias]
                            if per_input is not None and own_term:
                                for p in (norm.weight, norm.bias):
                                    p.register_hook(lambda g, b=len(x): g * b)
                        replaced[child] = norm
                    else:
                        replaced[child] = child
                parent._modules[name] = replaced[child]
        sigma_param = None
        if cfg.input is not InputMode.NONE:
            raw = cfg.sigma_init + math.log(-math.expm1(-cfg.sigma_init))
            shape = (len(x),) if cfg.input is InputMode.SAMPLE else (1,)
            sigma_param = nn.Parameter(torch.full(shape, raw, dtype=x.dtype, device=x.device))
            if not (learns and cfg.input in (InputMode.BATCH, InputMode.SAMPLE)):
                sigma_param.requires_grad_(False)
            elif cfg.input is InputMode.SAMPLE and own_term:
                sigma_param.register_hook(lambda g, b=len(x): g * b)

        def logits(inputs: Tensor) -> Tensor:
            if sigma_param is not None:
                inputs = gaussian_blur(inputs, F.softplus(sigma_param), cfg.max_kernel_size)
            return model(inputs)

        groups = [{"params": params}] if params else []
        if sigma_param is not None and sigma_param.requires_grad:
            groups.append({"params": [sigma_param], "lr": cfg.sigma_lr})
        if groups:
            optimizer = OPTIMIZERS.get(cfg.optimizer)(groups, cfg)  # a fresh optimizer per call
            objective = OBJECTIVES.get(cfg.objective)
            with torch.enable_grad():
                for _ in range(cfg.steps):
                    loss = objective(logits(x.detach()), cfg)
                    optimizer.zero_grad()
                    loss.backward(retain_graph=True)
                    optimizer.step()
        return logits(x)
