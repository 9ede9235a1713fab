"""Optimizer registry, AdaMod against its published update rule, and the ``adamod`` package's variant."""

import math

import pytest
import torch

from dent.defenses import OPTIMIZERS, DentConfig
from dent.defenses.optim import AdaMod, PackageAdaMod
from dent.errors import UnknownNameError


def adamod_rule(p0, grads, lr, beta1, beta2, beta3, eps=1e-8, weight_decay=0.0):
    """Ding et al. (2019), Algorithm 1, for one scalar parameter, in plain Python floats."""
    p, m, v, s = p0, 0.0, 0.0, 0.0
    trajectory = []
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        eta = lr / (math.sqrt(v_hat) + eps)
        s = beta3 * s + (1 - beta3) * eta
        p = p - min(eta, s) * m_hat
        trajectory.append(p)
    return trajectory


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=6e-3, betas=(0.99, 0.999), beta3=0.6, weight_decay=0.0),  # dent+
        dict(lr=1e-2, betas=(0.9, 0.999), beta3=0.999, weight_decay=0.1),
    ],
)
def test_adamod_follows_the_published_rule(hyper):
    p0, grads = gradients()
    got = trajectory(AdaMod, p0, grads, hyper)
    beta1, beta2 = hyper["betas"]
    for i in range(4):
        expected = adamod_rule(
            p0[i].item(), grads[:, i].tolist(), hyper["lr"], beta1, beta2, hyper["beta3"],
            weight_decay=hyper["weight_decay"],
        )
        torch.testing.assert_close(got[:, i], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_adamod_first_step_is_damped_sign_descent():
    # s starts at 0, so the first step is min(eta, (1 - beta3) eta) * m_hat = (1 - beta3) * lr * sign(g).
    param = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    optimizer = AdaMod([param], lr=0.1, betas=(0.9, 0.999), beta3=0.6)
    param.grad = torch.tensor([3.0, -0.5], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([1.0 - 0.04, -2.0 + 0.04], dtype=torch.float64))


def test_adamod_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta3"):
        AdaMod([torch.zeros(1, requires_grad=True)], beta3=1.0)


def test_optimizers_take_hyperparameters_from_the_config_and_keep_group_lr():
    config = DentConfig(lr=0.01, betas=(0.8, 0.99), beta3=0.7, momentum=0.5, weight_decay=0.2)
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    expected = {
        "adam": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.2),
        "adamod": dict(lr=0.01, betas=(0.8, 0.99), beta3=0.7, weight_decay=0.2),
        "adamod_official": dict(lr=0.01, betas=(0.8, 0.99), beta3=0.7, weight_decay=0.2),
        "sgd": dict(lr=0.01, momentum=0.5, weight_decay=0.2),
    }
    assert sorted(OPTIMIZERS.names()) == sorted(expected)
    for name, hyper in expected.items():
        optimizer = OPTIMIZERS.get(name)([{"params": [a]}, {"params": [b], "lr": 0.25}], config)
        for key, value in hyper.items():
            assert optimizer.param_groups[0][key] == value, (name, key)
        assert optimizer.param_groups[1]["lr"] == 0.25


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(UnknownNameError, match=r"unknown optimizer 'adamw'.*valid names: adam, adamod, adamod_official, sgd"):
        OPTIMIZERS.get("adamw")


def package_rule(p0, grads, lr, beta1, beta2, beta3, eps=1e-8, weight_decay=0.0):
    """The ``adamod`` package's (0.0.3) update for one scalar parameter, in plain Python floats."""
    p, m, v, s = p0, 0.0, 0.0, 0.0
    trajectory = []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        eta = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) / (math.sqrt(v) + eps)
        p = p - weight_decay * lr * p  # decoupled weight decay
        s = beta3 * s + (1 - beta3) * eta
        p = p - min(eta, s) * m
        trajectory.append(p)
    return trajectory


HYPERS = [
    dict(lr=6e-3, betas=(0.99, 0.999), beta3=0.6, weight_decay=0.0),  # the official dent+
    dict(lr=1e-2, betas=(0.9, 0.999), beta3=0.999, weight_decay=0.1),
]


def trajectory(optimizer_class, p0, grads, hyper):
    param = p0.clone().requires_grad_()
    optimizer = optimizer_class([param], **hyper)
    got = []
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
        got.append(param.detach().clone())
    return torch.stack(got)


def gradients(dtype=torch.float64):
    torch.manual_seed(0)
    grads = torch.randn(8, 4, dtype=dtype)
    grads[:, 1] = grads[:, 1].abs() * 1e-3  # small, same-sign gradients: where the momental bound matters
    grads[:, 2] = grads[:, 2] * 1e-8  # of the order of eps, where folding the bias correction matters most
    return torch.randn(4, dtype=dtype), grads


@pytest.mark.parametrize("hyper", HYPERS)
def test_package_adamod_follows_the_packages_rule(hyper):
    p0, grads = gradients()
    got = trajectory(PackageAdaMod, p0, grads, hyper)
    beta1, beta2 = hyper["betas"]
    for i in range(4):
        expected = package_rule(p0[i].item(), grads[:, i].tolist(), hyper["lr"], beta1, beta2, hyper["beta3"],
                                weight_decay=hyper["weight_decay"])
        torch.testing.assert_close(got[:, i], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore:This overload of add_ is deprecated:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hyper", HYPERS)
def test_package_adamod_equals_the_package(hyper, dtype):
    adamod = pytest.importorskip("adamod", reason="optional extra: pip install --no-deps adamod==0.0.3")
    p0, grads = gradients(dtype)
    tolerance = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(trajectory(PackageAdaMod, p0, grads, hyper),
                               trajectory(adamod.AdaMod, p0, grads, hyper), **tolerance)


def test_the_package_rule_moves_farther_than_the_published_rule_after_its_first_step():
    # A constant gradient: both rules take the damped sign step (1 - beta3) * lr first, then the package's
    # bias-corrected step sizes raise its bound faster (about 15% more movement after 6 steps).
    p0, grads = torch.zeros(1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)
    package, published = trajectory(PackageAdaMod, p0, grads, HYPERS[0]), trajectory(AdaMod, p0, grads, HYPERS[0])
    ratio = (package / published).squeeze(1)
    torch.testing.assert_close(ratio[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)  # eps aside
    assert (ratio[1:] > 1.1).all() and 1.1 < ratio[5] < 1.2
