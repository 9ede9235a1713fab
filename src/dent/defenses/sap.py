"""Stochastic activation pruning (SAP; Dhillon et al. 2018) on any model's activations.

After each activation layer (a model that applies its activations as functions, e.g. ``F.relu``, has none
as modules: then SAP prunes the inputs of its convolution and linear layers but the first, which in a
feed-forward network are the previous layers' activations; a tensor that feeds two layers, as a residual
block's input feeds its first convolution and its shortcut, is then drawn once per layer), for each input: with ``h`` its activation map flattened and
``p_j = |h_j| / sum_k |h_k|``, draw ``r = ceil(fraction * len(h))`` indices with replacement from ``p``;
keep the activations drawn at least once, each scaled by ``1 / (1 - (1 - p_j)**r)`` (the probability that
it is kept), and zero the rest. So every kept activation's expectation is the activation itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dent.errors import InvalidInputError

#: The activation layers SAP prunes after (module types of the wrapped model).
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.ReLU6)
#: Without activation modules: the layers whose inputs (all but the first layer's) SAP prunes instead.
WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def sap_factor(h: Tensor, fraction: float) -> Tensor:
    """One SAP draw on activations ``h`` [B, ...] (per input): the factor (0 or the inverse keep probability)
    that multiplies each activation."""
    flat = h.detach().flatten(1)
    draws = max(1, math.ceil(fraction * flat.shape[1]))
    tiny = torch.finfo(flat.dtype).tiny
    weight = flat.abs()
    total = weight.sum(dim=1, keepdim=True)
    p = weight / total.clamp_min(tiny)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    active = total.squeeze(1) > 0  # an all-zero map has nothing to draw from (and stays zero)
    if active.any():
        index = torch.multinomial(p[active], draws, replacement=True)
        kept[active] = torch.zeros_like(kept[active]).scatter_(1, index, True)
    keep_prob = -torch.expm1(draws * torch.log1p(-p))  # 1 - (1 - p)**r, accurate for tiny p (no 1 / 0)
    return torch.where(kept, 1 / keep_prob.clamp_min(tiny), torch.zeros_like(p)).view_as(h)


class SAP(nn.Module):
    """``model`` with SAP after each of its activation layers (:data:`ACTIVATIONS`), or, if it has none, on
    the inputs of its :data:`WEIGHTED_LAYERS` but the first (``self.pruned``: which of the two).

    Randomized (attacks use EOT); differentiable for a given draw (the mask is constant, the scale is
    treated as constant too: Dhillon et al.'s gradient).
    """

    randomized = True
    cost = 1.1

    def __init__(self, model: nn.Module, fraction: float = 1.0):
        super().__init__()
        self.model = model
        self.fraction = fraction
        self._active = False
        activations = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
        if activations:
            self.pruned = "activation outputs"
            self._hooks = [m.register_forward_hook(self._after_activation) for m in activations]
            return
        weighted = [m for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)][1:]
        if not weighted:
            raise InvalidInputError(
                f"SAP prunes activations, but {type(model).__name__} has no activation module (one of "
                f"{', '.join(t.__name__ for t in ACTIVATIONS)}) and fewer than two convolution or linear layers "
                "whose inputs would be activations")
        self.pruned = "inputs of convolution and linear layers but the first"
        self._hooks = [m.register_forward_pre_hook(self._before_layer) for m in weighted]

    def _after_activation(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        return output * sap_factor(output, self.fraction) if self._active else None

    def _before_layer(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if not self._active:
            return None
        return (inputs[0] * sap_factor(inputs[0], self.fraction),) + tuple(inputs[1:])

    def forward(self, x: Tensor) -> Tensor:
        # Hooks act only inside this call: the wrapped model may also serve other defenses of an evaluation.
        self._active = True
        try:
            return self.model(x)
        finally:
            self._active = False
