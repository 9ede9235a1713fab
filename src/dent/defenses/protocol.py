"""The defense protocol: what an honest attack needs to know about a defense, declared by the defense.

A defense is any ``nn.Module`` mapping images in [0, 1] to logits. It declares, as class (or instance)
attributes, the traits an attack must account for (Athalye, Carlini, Wagner 2018):

* ``differentiable``: its forward pass has a useful gradient w.r.t. the input. If not (JPEG, bit-depth
  reduction, median smoothing), a gradient attack must use BPDA: the exact forward pass with the gradient
  of ``bpda_surrogate()``, a differentiable module that approximates the defense (for an input transform,
  the identity: the straight-through estimator).
* ``randomized``: two calls on one input may answer differently. Then a gradient attack averages over
  draws (EOT), and clean accuracy should be measured over several draws (``evaluation.repeats``).
* ``adaptive``: it adapts at test time to the batch it is given (dent). Attacks then also need the
  defense-specific variants (transfer, mixed batches, through the adaptation; :mod:`dent.attacks.adaptive`).
* ``cost``: the relative cost of one call, in forward passes of the wrapped model (for budgeting attacks);
  a transform's is its cost on top of the model's (0: negligible).

A module that declares nothing is a differentiable, deterministic, static model of cost 1. Transforms
(image -> image) declare the same traits; :class:`Preprocessed` composes one with the model it feeds, and its
traits follow from both. :func:`traits_of` is the one place that reads the declarations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import Tensor, nn

from dent.errors import InvalidInputError


@dataclass(frozen=True)
class Traits:
    """A defense's declarations (see the module docstring)."""

    differentiable: bool = True
    randomized: bool = False
    adaptive: bool = False
    cost: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The traits of a module that declares nothing.
PLAIN = Traits()


def traits_of(module: nn.Module) -> Traits:
    """The traits ``module`` declares (attributes named as :class:`Traits`' fields), defaults for the rest."""
    values = {name: getattr(module, name, getattr(PLAIN, name)) for name in PLAIN.to_dict()}
    for name in ("differentiable", "randomized", "adaptive"):
        if not isinstance(values[name], bool):
            raise InvalidInputError(f"{type(module).__name__}.{name} must be True or False, got {values[name]!r}")
    cost = values["cost"]
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost < 0:
        raise InvalidInputError(f"{type(module).__name__}.cost must be a number >= 0, got {cost!r}")
    return Traits(**{**values, "cost": float(cost)})


def composed_traits(*parts: nn.Module) -> Traits:
    """The traits of a module that calls each of ``parts`` once per call: differentiable if all are, randomized
    or adaptive if any is, their costs added."""
    traits = [traits_of(part) for part in parts]
    return Traits(differentiable=all(t.differentiable for t in traits), randomized=any(t.randomized for t in traits),
                  adaptive=any(t.adaptive for t in traits), cost=sum(t.cost for t in traits))


def declare(module: nn.Module, traits: Traits) -> None:
    """Set ``traits`` as ``module``'s declarations (instance attributes)."""
    for name, value in traits.to_dict().items():
        setattr(module, name, value)


def inherit_traits(wrapper: nn.Module, inner: nn.Module) -> None:
    """Give ``wrapper`` (a module that calls ``inner`` once per call, e.g. on a composed batch) ``inner``'s
    traits. A non-differentiable inner needs the wrapper to define ``bpda_surrogate()`` too (the same
    wrapping around ``bpda_surrogate(inner)``)."""
    declare(wrapper, traits_of(inner))


class StraightThrough(nn.Module):
    """The BPDA view of a transform: forward ``transform(x)``, backward the gradient of ``approximation(x)``.

    ``approximation`` is the transform's ``bpda_surrogate()`` (default: the identity).
    """

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform
        self.approximation = bpda_surrogate(transform)

    def forward(self, x: Tensor) -> Tensor:
        approx = self.approximation(x)
        return self.transform(x).detach() + (approx - approx.detach())  # exactly the transform's values


class Identity(nn.Module):
    """The BPDA surrogate of a transform that approximately keeps its input (JPEG, quantization, smoothing)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def bpda_surrogate(module: nn.Module) -> nn.Module:
    """A differentiable module whose gradient stands in for ``module``'s (BPDA).

    A differentiable module is its own surrogate; otherwise the module's ``bpda_surrogate()`` method.
    A non-differentiable module without one is an error: BPDA needs an approximation to differentiate.
    """
    if traits_of(module).differentiable:
        return module
    method = getattr(module, "bpda_surrogate", None)
    if method is None:
        raise InvalidInputError(
            f"{type(module).__name__} declares differentiable = False but has no bpda_surrogate() method; "
            "expected one returning a differentiable nn.Module that approximates it (for an input transform, "
            "dent.defenses.protocol.Identity())"
        )
    surrogate = method()
    if not traits_of(surrogate).differentiable:
        raise InvalidInputError(f"{type(module).__name__}.bpda_surrogate() returned a module that is not differentiable")
    return surrogate


class Preprocessed(nn.Module):
    """``model(transform(x))``: an input transform before the model (or before another defense).

    Its traits combine both: differentiable only if both are, randomized or adaptive if either is, and
    the costs add. Its BPDA surrogate replaces each part by its own surrogate.
    """

    def __init__(self, transform: nn.Module, model: nn.Module):
        super().__init__()
        self.transform = transform
        self.model = model
        declare(self, composed_traits(transform, model))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.transform(x))

    def bpda_surrogate(self) -> nn.Module:
        return Preprocessed(differentiable_view(self.transform), bpda_surrogate(self.model))


def differentiable_view(transform: nn.Module) -> nn.Module:
    """``transform`` itself if it is differentiable, else its :class:`StraightThrough` (same values)."""
    return transform if traits_of(transform).differentiable else StraightThrough(transform)


def behind_transforms(defense: nn.Module) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
    """The module behind ``defense``'s chain of :class:`Preprocessed` transforms (``defense`` itself if it has
    none), and a function that puts another module behind the same transforms, each as its
    :func:`differentiable_view`. So attacks built on an inner defense's variants (dent's shortened or
    differentiated adaptation) see the transforms before it, with the transforms' exact values."""
    transforms = []
    while isinstance(defense, Preprocessed):
        transforms.append(defense.transform)
        defense = defense.model

    def rewrap(inner: nn.Module) -> nn.Module:
        for transform in reversed(transforms):
            inner = Preprocessed(differentiable_view(transform), inner)
        return inner

    return defense, rewrap
