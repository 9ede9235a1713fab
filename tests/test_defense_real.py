"""dent on the shipped nominal ResNet-18 and real CIFAR-10 images."""

from __future__ import annotations

import torch

from dent.data import load_subset
from dent.defenses import Dent, DentConfig
from dent.defenses.objectives import OBJECTIVES
from dent.models import load_model


def mean_entropy(logits: torch.Tensor) -> float:
    return OBJECTIVES.get("entropy")(logits, DentConfig()).item()


def test_entropy_decreases_over_steps_on_cifar10(cifar10_dir):
    torch.set_num_threads(2)
    data = load_subset("cifar10", "test", n=32, seed=1, data_dir=cifar10_dir)
    model = load_model("autoattack_resnet18")
    entropies = []
    with torch.no_grad():
        for steps in (0, 1, 3):
            defended = Dent(model, DentConfig(steps=steps, lr=1e-3))
            entropies.append(mean_entropy(defended(data.images)))
    torch.set_num_threads(1)
    assert entropies[0] > entropies[1] > entropies[2], entropies
