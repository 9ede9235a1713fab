"""Named layers of a model and their activations, read through forward hooks (the model is not changed)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dent.errors import InvalidInputError


def layer_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s submodules (``named_modules``, the model itself left out)."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called ``name``; an :class:`InvalidInputError` listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise InvalidInputError(f"{type(model).__name__} has no layer {name!r}; its layers (named_modules): "
                                f"{', '.join(layer_names(model)) or 'none'}")
    return modules[name]


def last_linear(model: nn.Module) -> str:
    """The name of ``model``'s last ``nn.Linear`` (in ``named_modules`` order): its classification head."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise InvalidInputError(f"{type(model).__name__} has no nn.Linear layer to read its last hidden layer from; "
                                "name a layer instead")
    return names[-1]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter or buffer lives (the CPU for a module with neither)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def run_capturing(model: nn.Module, layer: nn.Module, x: Tensor,
                  side: Literal["input", "output"] = "output") -> tuple[Tensor, Tensor]:
    """``model(x)`` and ``layer``'s (first) input or output during that call."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        captured.append(inputs[0] if side == "input" else output)

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise InvalidInputError(f"layer {type(layer).__name__} was not called in {type(model).__name__}'s forward pass")
    return logits, captured[-1]
