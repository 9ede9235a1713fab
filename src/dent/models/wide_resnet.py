"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR, with the module layout of TRADES / RobustBench.

Layout: ``conv1`` stem (16 channels), ``block1..3`` each holding a ``layer`` sequential of pre-activation
blocks (``bn1, conv1, bn2, conv2`` and ``convShortcut`` where the width changes), final ``bn1``, and ``fc``.

``sub_block1=True`` adds an unused copy of ``block1`` named ``sub_block1``: several RobustBench checkpoints
(Carmon2019Unlabeled, Wu2020Adversarial_extra, ...) contain its weights, so the module must exist for strict
loading, but it does not take part in the forward pass (as in RobustBench).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dent.models.normalization import NormalizationSpec, make_normalization


class WideBasicBlock(nn.Module):
    """Pre-activation block. Where the width changes, the activated input feeds both branches."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = c_in == c_out
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        residual = x if self.convShortcut is None else self.convShortcut(act)
        return residual + out


class WideStage(nn.Module):
    def __init__(self, n_blocks: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        normalization: NormalizationSpec = None,
        sub_block1: bool = False,
        bias_last: bool = True,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = make_normalization(normalization)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        if sub_block1:
            self.sub_block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
