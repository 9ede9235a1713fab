"""Pre-activation ResNet-18 for CIFAR, with the module layout of RobustBench's ``PreActResNet``.

Layout: ``conv1`` (no BN after the stem), ``layer1..4`` of pre-activation blocks (``bn1, conv1, bn2, conv2``
and, when the shape changes, a ``shortcut`` sequential holding one 1x1 conv), optionally ``bn`` before the
classifier, and ``linear``.

Two block variants exist in RobustBench, differing only in what the projection shortcut sees:

* ``shortcut_from="input"`` -- the block input ``x`` (RobustBench ``PreActBlock``; Wong2020Fast).
* ``shortcut_from="activation"`` -- ``relu(bn1(x))`` (RobustBench ``PreActBlockV2``; Rice2020Overfitting L2,
  which also has ``bn_before_fc=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dent.models.normalization import NormalizationSpec, make_normalization

SHORTCUT_SOURCES = ("input", "activation")


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut_from: str = "input"):
        super().__init__()
        if shortcut_from not in SHORTCUT_SOURCES:
            raise ValueError(f"shortcut_from must be one of {SHORTCUT_SOURCES}, got {shortcut_from!r}")
        self.shortcut_from = shortcut_from
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_projection = stride != 1 or c_in != c_out
        if self.has_projection:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        if self.has_projection:
            residual = self.shortcut(x if self.shortcut_from == "input" else act)
        else:
            residual = x
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + residual


class PreActResNet(nn.Module):
    def __init__(
        self,
        num_blocks=(2, 2, 2, 2),
        num_classes: int = 10,
        normalization: NormalizationSpec = "cifar10",
        shortcut_from: str = "input",
        bn_before_fc: bool = False,
    ):
        super().__init__()
        self.normalize = make_normalization(normalization)
        self.bn_before_fc = bn_before_fc
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        c_in = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(c_in, width, stride, shortcut_from))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
