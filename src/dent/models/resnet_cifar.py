"""ResNet-26-w: the paper's analysis architecture (ResNet-26-4 = width multiplier 4).

A CIFAR ResNet (He et al., 2016) in the style of pycls' CIFAR ResNets, widened as in Zagoruyko & Komodakis:
a 3x3 stem, three stages of four post-activation basic blocks with 16w, 32w and 64w channels (strides 1, 2,
2), global average pooling and a linear classifier ``fc``: 1 + 3 * 4 * 2 + 1 = 26 weighted layers.
Shortcuts are identity, or a 1x1 conv + BN projection where the shape changes. Inputs in [0, 1] are
normalized inside the model (CIFAR-10 mean/std by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dent.models.normalization import NormalizationSpec, make_normalization


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.proj is None else self.proj(x)))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int = 26,
        width: int = 4,
        num_classes: int = 10,
        normalization: NormalizationSpec = "cifar10",
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (n >= 1), got {depth}")
        if width < 1:
            raise ValueError(f"width multiplier must be >= 1, got {width}")
        n = (depth - 2) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.depth, self.width = depth, width
        self.normalize = make_normalization(normalization)
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        )
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(ResBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.stem(self.normalize(x)))
        out = self.stage3(self.stage2(self.stage1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
