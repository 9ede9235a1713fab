"""ResNet-18 for CIFAR (3x3 stem, no max-pool), with the module layout of the common PyTorch CIFAR code.

The parameter names (``conv1``, ``bn1``, ``layer1..4``, ``linear``; blocks with ``conv1/bn1/conv2/bn2`` and a
``shortcut`` sequential) match the example model shipped with pyautoattack, so its checkpoint loads with
strict keys. That model was trained on raw [0, 1] inputs: no normalization by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dent.models.normalization import NormalizationSpec, make_normalization


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:  # projection: 1x1 conv + BN
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:  # identity, kept as an (empty) module so the layout matches the reference code
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with four stages of 64/128/256/512 channels and a ``linear`` classifier."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, normalization: NormalizationSpec = None):
        super().__init__()
        self.normalize = make_normalization(normalization)
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
