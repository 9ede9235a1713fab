"""Shared helpers of the training tests: a tiny BatchNorm convnet, an easy synthetic data set, configs."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dent.training.config import TrainConfig
from dent.data.split import Split


def tiny_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def build_tiny(arch: str) -> nn.Module:
    return tiny_net()


def build_tiny_pixelcnn(arch: str) -> nn.Module:
    from dent.defenses.purification import PixelCNN

    return PixelCNN(channels=8, layers=1)


def builder_for(recipe: str):
    """The tiny model a recipe trains: a classifier, or the PixelCNN of the density recipe."""
    return build_tiny_pixelcnn if recipe == "pixelcnn" else build_tiny


def synthetic_split(n: int, seed: int = 0, size: int = 16) -> Split:
    """Ten classes, each a distinct flat color (Linf distance >= 0.3 between classes) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor(list(itertools.product([0.2, 0.5, 0.8], repeat=3))[:10])
    y = torch.arange(n) % 10
    x = (colors[y][:, :, None, None] + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return Split(x.float().contiguous(), y.long(), tuple(f"c{i}" for i in range(10)), "synthetic-train")


def tiny_config(recipe: str = "nominal", *overrides: str) -> TrainConfig:
    base = [
        "model.arch", "tiny", "device", "cpu", "train.recipe", recipe, "train.epochs", "1",
        "train.batch_size", "20", "train.holdout", "40", "train.lr", "0.1", "train.eval.steps", "2",
        "train.progress", "false",
    ]
    return TrainConfig.load(None, [*base, *overrides])


import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one thread (the machine is shared; small ops are faster without threading)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
