"""Helpers for the evaluation and attack tests: a tiny BatchNorm convnet, random data, a fake CIFAR-10
release folder and a small real-architecture checkpoint. Importable from test modules (pytest puts tests/
on sys.path) and from subprocesses (with tests/ on PYTHONPATH)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def tiny_net(seed: int = 0, n_classes: int = 10, width: int = 8) -> nn.Module:
    """conv -> BatchNorm -> ReLU -> pool -> linear; eval mode, non-trivial running statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, n_classes),
    )
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@dataclass
class FakeSplit:
    images: torch.Tensor
    labels: torch.Tensor


def fake_data(n: int = 24, size: int = 8, seed: int = 0, model: nn.Module | None = None) -> FakeSplit:
    """Random images in [0, 1]; with ``model``, the labels are its predictions (clean accuracy 100%)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    if model is not None:
        with torch.no_grad():
            labels = model(images).argmax(1)
    else:
        labels = torch.randint(0, 10, (n,), generator=g)
    return FakeSplit(images, labels)


def write_fake_cifar10(root: Path, n_per_class: int = 4, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py`` folder under ``root`` with a small random test split; returns ``root``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return Path(root)


def write_small_checkpoint(path: Path, arch: str = "resnet26_1", seed: int = 0) -> Path:
    """A randomly initialized checkpoint of a registered architecture (for ``model.arch A model.checkpoint P``)."""
    from dent.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


class NoisyDefense(nn.Module):
    """A user's own defense for the tests: Gaussian noise on the input, then the model (randomized)."""

    randomized = True

    def __init__(self, model: nn.Module, std: float = 0.1):
        super().__init__()
        self.model = model
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x + self.std * torch.randn_like(x)).clamp(0, 1))


def wait_for_stored_units(proc, count, at_least: int, timeout: float = 240) -> None:
    """Poll ``count()`` (units stored so far) until it reaches ``at_least`` while the process ``proc`` runs;
    fail the test if the process ends or the time runs out first."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while count() < at_least:
        if proc.poll() is not None:
            pytest.fail(f"evaluation ended before it could be killed: {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("evaluation too slow to reach the kill point")
        time.sleep(0.02)


def units_stored(run_dir: Path) -> int:
    """Units in a run directory's store so far (0 before its tables exist); safe while a run writes it."""
    import sqlite3

    db_path = run_dir / "results.sqlite"
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    except sqlite3.OperationalError:  # created but schema not yet there
        return 0
