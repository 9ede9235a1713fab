"""Input normalization as part of the model: every model in dent takes images in [0, 1].

The constants are buffers that are *not* saved in state dicts (``persistent=False``), so a network with a
normalization layer has exactly the state-dict keys of the same network without one, and checkpoints from
other code bases (which normalize in their data loader) load unchanged.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

#: CIFAR-10 per-channel mean / std, as used by most CIFAR-10 code (and RobustBench's models).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
#: The rounded constants of Rony et al. (2019, DDN), as RobustBench's Rony2019Decoupling uses them.
DDN_MEAN = (0.491, 0.482, 0.447)
DDN_STD = (0.247, 0.243, 0.262)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with constants that move with the model but are not saved."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {tuple(mean)} vs {tuple(std)}")
        if any(v <= 0 for v in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean_values, self.std_values = tuple(mean), tuple(std)  # as given (readable on any device)
        mean_t = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean_values}, std={self.std_values}"


class PerImageStandardize(nn.Module):
    """Standardize each image by its own mean and (unbiased) std over all pixels and channels.

    The std is floored at ``1 / sqrt(C*H*W)`` (as in ``tf.image.per_image_standardization``); this is the
    input transform of the MMA-training models (Ding et al., 2020) in RobustBench.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        floor = torch.full_like(std, 1.0 / float(x[0].numel()) ** 0.5)
        return (x - mean) / torch.maximum(std, floor)


#: Named normalizations, for the ``normalization=`` argument of the architecture factories.
NAMED_NORMALIZATIONS = {
    "none": lambda: nn.Identity(),
    "cifar10": lambda: Normalize(CIFAR10_MEAN, CIFAR10_STD),
    "ddn": lambda: Normalize(DDN_MEAN, DDN_STD),
    "symmetric": lambda: Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x -> 2x - 1
    "per_image": lambda: PerImageStandardize(),
}

NormalizationSpec = Union[None, str, nn.Module, tuple]


def make_normalization(spec: NormalizationSpec) -> nn.Module:
    """A normalization layer from a spec: ``None``/``"none"``, a name from :data:`NAMED_NORMALIZATIONS`,
    a ``(mean, std)`` pair, or a module (used as is)."""
    if spec is None:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key not in NAMED_NORMALIZATIONS:
            from dent.errors import ConfigError

            raise ConfigError(
                f"unknown normalization {spec!r}; valid: {', '.join(NAMED_NORMALIZATIONS)} or a (mean, std) pair"
            )
        return NAMED_NORMALIZATIONS[key]()
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Normalize(spec[0], spec[1])
    raise TypeError(f"normalization must be None, a name, a (mean, std) pair or a module, got {spec!r}")


class Normalized(nn.Module):
    """Wrap a network trained on normalized inputs so that it takes images in [0, 1].

    ``Normalized(net, mean, std)(x) == net((x - mean) / std)``. The wrapped network is ``.model``; the
    wrapper adds no state-dict entries of its own (its keys are ``model.<key>``; dent's checkpoint loader
    also accepts the unprefixed keys of the bare network).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
