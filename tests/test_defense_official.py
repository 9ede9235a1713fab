"""The official dent+ exactly: ``Dent(model, DentConfig(preset="dent_plus_official"))`` against a reference.

The reference follows the official code's published semantics (DequanWang/dent, dent.py with cfgs/dent.yaml),
written here independently of the project's implementation: every BatchNorm2d becomes a "sample-aware static"
BatchNorm with per-input [B, C] parameters repeated from the checkpoint and the running statistics folded
into one scale and shift; each call makes fresh parameters and a fresh optimizer; K steps of
``loss = shot(model(x)); zero_grad; backward; step`` on the batch-mean loss; then the prediction. The
optimizer is the ``adamod`` package when it is installed, and always a transcription of its rule.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from dent.defenses import Dent, DentConfig

OFFICIAL = dict(lr=6e-3, betas=(0.99, 0.999), beta3=0.6, weight_decay=0.0, steps=6)


class TranscribedAdaMod(torch.optim.Optimizer):
    """The ``adamod`` package's update (0.0.3), transcribed from its source, one tensor at a time."""

    def __init__(self, params, lr, betas, beta3, weight_decay, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, beta3=beta3, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), s=torch.zeros_like(p))
                state["t"] += 1
                t, g = state["t"], p.grad
                state["m"] = beta1 * state["m"] + (1 - beta1) * g
                state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t) / (state["v"].sqrt() + group["eps"])
                p.mul_(1 - group["weight_decay"] * group["lr"])
                state["s"] = group["beta3"] * state["s"] + (1 - group["beta3"]) * step_size
                p.sub_(torch.minimum(step_size, state["s"]) * state["m"])


def package_adamod():
    adamod = pytest.importorskip("adamod", reason="the adamod package is an optional extra: pip install --no-deps adamod==0.0.3")
    return adamod.AdaMod


OPTIMIZERS = {"transcribed": lambda: TranscribedAdaMod, "package": package_adamod}


class SampleAwareStaticBatchNorm2d(nn.Module):
    """Per-input affine parameters [B, C] on the running statistics, folded into one scale and shift."""

    def __init__(self, norm: nn.BatchNorm2d, batch: int):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().unsqueeze(0).repeat(batch, 1))
        self.bias = nn.Parameter(norm.bias.detach().unsqueeze(0).repeat(batch, 1))
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt().reshape(1, -1)
        bias = self.bias - self.running_mean.reshape(1, -1) * scale
        return x * scale[:, :, None, None] + bias[:, :, None, None]


def shot(logits: Tensor) -> Tensor:
    p = logits.softmax(1)
    mean = p.mean(0)
    return -(p * torch.log(p + 1e-5)).sum(1).mean(0) + (mean * torch.log(mean + 1e-5)).sum()


def convert(module: nn.Module, batch: int) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SampleAwareStaticBatchNorm2d(child, batch))
        else:
            convert(child, batch)
    return module


def official_dent_plus(model: nn.Module, x: Tensor, optimizer_class, steps=6, lr=6e-3, betas=(0.99, 0.999),
                       beta3=0.6, weight_decay=0.0) -> Tensor:
    model = convert(copy.deepcopy(model), len(x))
    model.train()  # as the official code; its sample-aware BatchNorm ignores the mode
    model.requires_grad_(False)
    params = []
    for module in model.modules():
        if isinstance(module, SampleAwareStaticBatchNorm2d):
            module.requires_grad_(True)
            params += [module.weight, module.bias]
    optimizer = optimizer_class(params, lr=lr, betas=betas, beta3=beta3, weight_decay=weight_decay)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the package's deprecated add_(scalar, tensor) calls
        for _ in range(steps):
            loss = shot(model(x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(x)


def small_bn_cnn(seed=0) -> nn.Module:
    """A float32 BatchNorm2d CNN for 32x32 RGB, with non-trivial BN parameters and statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        net[-1].weight.mul_(8)  # logits of a trained model's scale (a few units), so the loss is not flat
    return net.eval()


def cifar_batch(n: int) -> Tensor:
    from dent.data import load_subset

    return load_subset("cifar10", "test", n=n, seed=0).images


def dent_plus(model: nn.Module, x: Tensor, **changes) -> Tensor:
    with torch.no_grad():
        return Dent(model, DentConfig(preset="dent_plus_official", **changes))(x)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_official_preset_equals_the_official_algorithm_on_a_small_cnn(optimizer, cifar10_dir):
    model, x = small_bn_cnn(), cifar_batch(32)
    expected = official_dent_plus(model, x, OPTIMIZERS[optimizer]())
    got = dent_plus(model, x)
    assert (got - model(x)).abs().max() > 1e-2  # the adaptation does move the logits
    assert (got - expected).abs().max().item() < 1e-4


def test_transcribed_adamod_is_the_package(cifar10_dir):
    """The reference's two optimizers agree, so the transcription stands in for the package where it is absent."""
    model, x = small_bn_cnn(), cifar_batch(16)
    package = official_dent_plus(model, x, package_adamod())
    transcribed = official_dent_plus(model, x, TranscribedAdaMod)
    assert (package - transcribed).abs().max().item() < 1e-5


def test_official_preset_follows_the_reference_at_other_steps_and_batch_sizes(cifar10_dir):
    model = small_bn_cnn(seed=1)
    for n, steps in ((4, 1), (24, 3)):
        x = cifar_batch(n)
        expected = official_dent_plus(model, x, TranscribedAdaMod, steps=steps)
        assert (dent_plus(model, x, steps=steps) - expected).abs().max().item() < 1e-4


def test_batch_size_independent_variant_deviates_deliberately(cifar10_dir):
    model, x = small_bn_cnn(), cifar_batch(32)
    with torch.no_grad():
        bsi = Dent(model, DentConfig(preset="dent_plus_bsi"))(x)
    assert (bsi - dent_plus(model, x)).abs().max() > 1e-2


@pytest.mark.parametrize("optimizer", ["adamod", "sgd"])
def test_batch_size_independent_variant_stays_independent_of_the_batch_size(optimizer):
    """With an objective of per-input terms, an input's adaptation does not depend on the batch around it."""
    model = small_bn_cnn()
    torch.manual_seed(3)
    x = torch.rand(12, 3, 32, 32)
    config = DentConfig(preset="dent_plus_bsi", objective="entropy", optimizer=optimizer, lr=0.05)
    with torch.no_grad():
        whole, part = Dent(model, config)(x), Dent(model, config)(x[:4])
    assert (whole[:4] - part).abs().max().item() < 1e-5


def test_batch_mean_gradients_depend_on_the_batch_size():
    model = small_bn_cnn()
    torch.manual_seed(3)
    x = torch.rand(12, 3, 32, 32)
    config = DentConfig(preset="dent_plus_official", objective="entropy", optimizer="sgd", lr=0.05)
    with torch.no_grad():
        whole, part = Dent(model, config)(x), Dent(model, config)(x[:4])
    assert (whole[:4] - part).abs().max().item() > 1e-3  # SGD steps shrink as 1/B


@pytest.mark.slow
def test_official_preset_equals_the_official_algorithm_on_the_shipped_resnet18(cifar10_dir):
    from dent.models import load_model

    model, x = load_model("autoattack_resnet18").eval(), cifar_batch(128)
    expected = official_dent_plus(model, x, TranscribedAdaMod)
    got = dent_plus(model, x)
    assert (got - expected).abs().max().item() < 1e-4
