"""A detector subnetwork on a hidden layer (Metzen, Genewein, Fischer, Bischoff, ICLR 2017).

A small network reads the activations of one named layer of the (frozen) model, through a forward hook, and
is trained as a binary classifier, clean (0) vs adversarial (1). Metzen et al. train it against adversarial
examples regenerated during training (a dynamic adversary); :meth:`SubnetworkDetector.fit` takes a fixed set.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.defenses.detection.base import Detector, watched_traits
from dent.defenses.detection.layers import find_layer, model_device, run_capturing
from dent.errors import InvalidInputError


def detector_network(shape: Sequence[int], width: int) -> nn.Module:
    """The subnetwork for activations of ``shape`` (without the batch): two 3 x 3 convolutions, a 1 x 1 one and a
    global average for maps [C, H, W] (Metzen et al.'s shape, smaller); two linear layers for vectors [D]."""
    if len(shape) == 3:
        return nn.Sequential(
            nn.Conv2d(shape[0], width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], width), nn.ReLU(), nn.Linear(width, 1))
    raise InvalidInputError(f"a detector subnetwork reads activations [C, H, W] or [D]; got {tuple(shape)}")


class SubnetworkDetector(Detector):
    """Score = the subnetwork's logit on the activations (output) of ``model``'s layer ``layer``.

    The subnetwork is built for the activations of one probe input of ``input_shape`` [C, H, W]. After ``fit``
    the threshold is its decision boundary (logit 0); :meth:`calibrate` may move it to a target false-positive rate.
    """

    needs_training = True

    def __init__(self, model: nn.Module, layer: str, input_shape: Sequence[int] = (3, 32, 32), width: int = 32):
        super().__init__()
        hooked = find_layer(model, layer)
        self.model, self.layer = model, layer
        traits = watched_traits(model, type(self).__name__)
        self.randomized, self.adaptive, self.cost = traits.randomized, traits.adaptive, traits.cost
        with torch.no_grad():
            _, probe = run_capturing(model, hooked, torch.zeros(1, *input_shape, device=model_device(model)))
        self.net = detector_network(probe.shape[1:], width).to(probe.device)

    def activations(self, x: Tensor) -> Tensor:
        """The watched layer's output on ``x`` (looked up by name, not stored: a second submodule would repeat
        its weights in the state dict)."""
        return run_capturing(self.model, find_layer(self.model, self.layer), x)[1]

    def score(self, x: Tensor) -> Tensor:
        self.require_trained()
        return self.net(self.activations(x)).squeeze(1)

    def fit(self, clean_images: Tensor, adversarial_images: Tensor, epochs: int = 20, lr: float = 1e-3,
            batch_size: int = 128) -> "SubnetworkDetector":
        """Train the subnetwork (Adam, binary cross-entropy) on the model's activations of ``clean_images`` (0)
        and ``adversarial_images`` (1); the model itself is not changed."""
        images = torch.cat([clean_images, adversarial_images])
        with torch.no_grad():
            inputs = torch.cat([self.activations(chunk) for chunk in images.split(batch_size)])
        targets = torch.cat([torch.zeros(len(clean_images)), torch.ones(len(adversarial_images))]).to(inputs)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                for index in torch.randperm(len(inputs), device=inputs.device).split(batch_size):
                    optimizer.zero_grad()
                    loss = F.binary_cross_entropy_with_logits(self.net(inputs[index]).squeeze(1), targets[index])
                    loss.backward()
                    optimizer.step()
        self._mark_trained()
        return self
