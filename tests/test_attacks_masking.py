"""The gradient-masking diagnostic: zero, missing and non-finite plain gradients are counted per point."""

from __future__ import annotations

import torch
from torch import nn

from dent.attacks.masking import logits_and_plain_gradient
from eval_support import fake_data, tiny_net


class Rounded(nn.Module):
    """Bit-depth reduction to 1 bit before the model: gradient exactly zero almost everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x))


class OutsideAutograd(nn.Module):
    """Computes through numpy, as a codec would: no gradient at all."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.no_grad():
            return self.model(torch.from_numpy(x.detach().numpy().copy()))


class NaNGradient(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.sqrt(x - x.detach()))  # value sqrt(0) = 0, gradient 1 / (2 sqrt(0)) = inf


def test_plain_gradient_counts():
    net = tiny_net()
    data = fake_data(5, model=net)
    x, y = data.images, data.labels
    expected = {"plain": (net, 0, 0), "rounded": (Rounded(net), 5, 0), "outside": (OutsideAutograd(net), 5, 0),
                "nan": (NaNGradient(net), 0, 5)}
    for name, (defense, zero, nonfinite) in expected.items():
        logits, counts = logits_and_plain_gradient(defense, x, y)
        assert counts == {"n": 5, "zero": zero, "nonfinite": nonfinite}, name
        assert not logits.requires_grad and torch.equal(logits, defense(x).detach()), name
    # Works for callers under no_grad, and leaves the input untouched.
    with torch.no_grad():
        _, counts = logits_and_plain_gradient(net, x, y)
    assert counts["zero"] == 0 and not x.requires_grad
