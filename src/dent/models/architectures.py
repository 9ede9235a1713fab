"""The architectures registry: name -> factory ``(num_classes=10, **kw) -> nn.Module`` (random weights).

Every factory accepts ``normalization=`` (``None``, a name such as ``"cifar10"``, a ``(mean, std)`` pair or a
module; see :mod:`dent.models.normalization`); the default is what the original models of that layout use.
The first docstring line of a factory is its description in ``dent models``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from dent.errors import ConfigError
from dent.models.preact_resnet import PreActResNet
from dent.models.resnet import ResNet
from dent.models.resnet_cifar import CifarResNet
from dent.models.wide_resnet import WideResNet
from dent.registry import Registry

ArchFactory = Callable[..., nn.Module]

ARCHITECTURES: Registry[ArchFactory] = Registry("architecture")


def resnet18(num_classes: int = 10, normalization=None) -> nn.Module:
    """ResNet-18 (CIFAR), pyautoattack example layout; raw [0,1] inputs by default."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, normalization=normalization)


def preact_resnet18(
    num_classes: int = 10, normalization="cifar10", shortcut_from: str = "input", bn_before_fc: bool = False
) -> nn.Module:
    """PreAct ResNet-18 (CIFAR), RobustBench layout; CIFAR-10 mean/std normalization by default."""
    return PreActResNet(
        (2, 2, 2, 2), num_classes=num_classes, normalization=normalization,
        shortcut_from=shortcut_from, bn_before_fc=bn_before_fc,
    )


def _wrn(depth: int, widen_factor: int) -> ArchFactory:
    def factory(num_classes: int = 10, normalization=None, sub_block1: bool = False, bias_last: bool = True):
        return WideResNet(
            depth=depth, widen_factor=widen_factor, num_classes=num_classes, normalization=normalization,
            sub_block1=sub_block1, bias_last=bias_last,
        )

    factory.__name__ = f"wrn{depth}_{widen_factor}"
    factory.__doc__ = f"WRN-{depth}-{widen_factor}, TRADES/RobustBench layout; raw [0,1] inputs by default."
    return factory


def resnet26(num_classes: int = 10, width: int = 4, normalization="cifar10") -> nn.Module:
    """ResNet-26-w (CIFAR, 3 stages x 4 blocks, 16w/32w/64w channels; default w=4 as in the paper)."""
    return CifarResNet(depth=26, width=width, num_classes=num_classes, normalization=normalization)


def _resnet26_width(width: int) -> ArchFactory:
    def factory(num_classes: int = 10, normalization="cifar10") -> nn.Module:
        return resnet26(num_classes=num_classes, width=width, normalization=normalization)

    factory.__name__ = f"resnet26_{width}"
    channels = f"{16 * width}/{32 * width}/{64 * width}"
    factory.__doc__ = f"ResNet-26-{width} (CIFAR, 3 stages x 4 blocks, {channels} channels)."
    return factory


ARCHITECTURES.register("resnet18", resnet18)
ARCHITECTURES.register("preact_resnet18", preact_resnet18)
ARCHITECTURES.register("wrn28_10", _wrn(28, 10))
ARCHITECTURES.register("wrn34_10", _wrn(34, 10))
ARCHITECTURES.register("wrn28_4", _wrn(28, 4))
ARCHITECTURES.register("resnet26", resnet26)
ARCHITECTURES.register("resnet26_4", _resnet26_width(4))
ARCHITECTURES.register("resnet26_1", _resnet26_width(1))


def describe_architecture(factory: ArchFactory) -> str:
    return (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""


def build_model(arch: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A randomly initialised network of a registered architecture (in train mode, on CPU)."""
    factory = ARCHITECTURES.get(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        inspect.signature(factory).bind(num_classes=num_classes, **kwargs)
    except TypeError as exc:  # an unknown keyword argument
        valid = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
        raise ConfigError(
            f"cannot build architecture {ARCHITECTURES.canonical(arch)!r}: {exc}; its options: {', '.join(valid)}"
        ) from None
    return factory(num_classes=num_classes, **kwargs)
