"""DifferentiableDent: same answers as Dent, and an input gradient through the adaptation steps that matches
central finite differences (float64, tiny BN convnet, K = 2 and 3, Delta and Sigma, Adam / AdaMod / SGD)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent.defenses import Dent, DentConfig
from dent.defenses.differentiable import DifferentiableDent, functional_rule, safe_sqrt, shortened
from dent.defenses.optim import AdaMod, PackageAdaMod
from dent.errors import InvalidInputError
from test_defense_dent import batch, tiny_net

# Learning rates large enough that the adaptation visibly changes the gradient (so the check discriminates),
# and small enough that sigma stays clear of the blur's kernel-size steps: the kernel has 2*ceil(3 sigma)+1
# taps, so the defense is discontinuous in the input where ceil(3 sigma) changes (finite differences across
# such a step are meaningless).
OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=0.05, sigma_lr=0.25),
    "adamod": dict(optimizer="adamod", lr=0.05, beta3=0.5, sigma_lr=0.25),
    "adamod_official": dict(optimizer="adamod_official", lr=0.05, beta3=0.5, sigma_lr=0.25),
    "sgd": dict(optimizer="sgd", lr=20.0, momentum=0.9, sigma_lr=30.0),
}
TARGETS = {
    "delta-batch": dict(affine="batch"),
    "delta-sample": dict(affine="sample", objective="infomax"),
    # the official dent+'s gradients and arithmetic (preset dent_plus_official)
    "delta-sample-official": dict(affine="sample", objective="shot", sample_grad="batch_mean", bn_arithmetic="folded"),
    "sigma-batch": dict(affine="none", input="batch"),
    "sigma-sample": dict(affine="none", input="sample", stats="batch"),
}


def images(n=4, seed=3):
    return batch(n, seed=seed) * 0.8 + 0.1  # away from the [0, 1] border, so +-h stays valid


def directional(f, x, v, h=1e-5):
    """Central differences with one Richardson extrapolation step (error O(h^4)): the adapted defense is
    strongly curved (Adam's normalized steps), so plain central differences would need a tiny h."""

    def central(step):
        with torch.no_grad():
            return ((f(x + step * v) - f(x - step * v)) / (2 * step)).item()

    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_gradient_through_adaptation_matches_finite_differences(optimizer, target, steps):
    net = tiny_net(seed=steps).eval()
    cfg = DentConfig(steps=steps, **OPTIMIZERS[optimizer], **TARGETS[target])
    dent = Dent(net, cfg)
    diff = DifferentiableDent(dent)
    x = images()
    torch.manual_seed(7)
    w = torch.randn(len(x), 5, dtype=x.dtype)
    v = torch.randn_like(x)

    def f(z):
        return (diff(z) * w).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xr), xr)
    analytic = (grad * v).sum().item()
    numeric = directional(f, x, v)
    # Dent's own gradient (through the final prediction only) for comparison: it must differ clearly.
    xr = x.clone().requires_grad_(True)
    (final_only,) = torch.autograd.grad((dent(xr) * w).sum(), xr)
    final_only = (final_only * v).sum().item()
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric) + 1e-12, (analytic, numeric)
    # Differentiating the adaptation changes the gradient by far more than the tolerance (>= 0.1%).
    assert abs(final_only - numeric) > 1e-3 * abs(numeric), (final_only, numeric)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("target", list(TARGETS))
def test_same_answers_as_dent_in_float32(optimizer, target):
    net = tiny_net(dtype=torch.float32).eval()
    cfg = DentConfig(steps=3, **OPTIMIZERS[optimizer], **TARGETS[target])
    dent = Dent(net, cfg)
    x = images(6).float()
    with torch.no_grad():
        expected = dent(x)
    out = DifferentiableDent(dent)(x.clone().requires_grad_(True))
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # not differentiated: a plain adaptation
        assert torch.allclose(DifferentiableDent(dent)(x), expected, atol=1e-6, rtol=1e-5)


def test_exactly_zero_gradients_do_not_make_nans():
    """A channel that ReLU kills everywhere gets exactly 0 gradients, so Adam's v = 0 (sqrt'(0) = inf)."""
    net = tiny_net().eval()
    with torch.no_grad():
        net[1].bias[0] = -100.0  # channel 0 of the first BN is negative everywhere -> ReLU output 0
    dent = Dent(net, DentConfig(steps=2, optimizer="adam", lr=0.05))
    diff = DifferentiableDent(dent)
    x = images()
    w = torch.randn(len(x), 5, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def f(z):
        return (diff(z) * w).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xr), xr)
    assert torch.isfinite(grad).all()
    assert abs((grad * v).sum().item() - directional(f, x, v)) < 1e-6


def test_safe_sqrt_derivative_at_zero():
    v = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = safe_sqrt(v)
    (g,) = torch.autograd.grad(out.sum(), v)
    assert out.tolist() == [0.0, 2.0] and g.tolist() == [0.0, 0.25]


def _grad(model, x, w):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((model(xr) * w).sum(), xr)
    return g


def test_horizon_and_checkpoint():
    net = tiny_net().eval()
    dent = Dent(net, DentConfig(steps=3, optimizer="adam", lr=0.05))
    x = images()
    w = torch.randn(len(x), 5, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    full = _grad(DifferentiableDent(dent), x, w)
    # Checkpointing recomputes the steps in the backward pass: the same gradient.
    assert torch.allclose(_grad(DifferentiableDent(dent, checkpoint=True), x, w), full, atol=1e-12)
    # A horizon covering every step is the full gradient; horizon 0 is Dent's own (final prediction only).
    assert torch.allclose(_grad(DifferentiableDent(dent, horizon=5), x, w), full, atol=1e-12)
    assert torch.allclose(_grad(DifferentiableDent(dent, horizon=0), x, w), _grad(dent, x, w), atol=1e-12)
    truncated = _grad(DifferentiableDent(dent, horizon=1, checkpoint=True), x, w)
    assert not torch.allclose(truncated, full) and not torch.allclose(truncated, _grad(dent, x, w))
    d = DifferentiableDent(dent, horizon=1, checkpoint=True).describe()
    assert d == {"steps": 3, "differentiated_steps": 1, "horizon": 1, "truncated": True, "checkpoint": True,
                 "optimizer": "adam"}


def test_nothing_to_adapt_is_the_plain_forward():
    net = tiny_net().eval()
    dent = Dent(net, DentConfig(steps=0, input="static"))
    x = images()
    diff = DifferentiableDent(dent)
    assert diff.describe()["differentiated_steps"] == 0
    with torch.no_grad():
        assert torch.equal(diff(x), dent(x))


@pytest.mark.parametrize("make, kwargs", [
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)),
    (AdaMod, dict(lr=0.01, betas=(0.8, 0.9), beta3=0.7, weight_decay=0.1)),
    (PackageAdaMod, dict(lr=0.01, betas=(0.8, 0.9), beta3=0.7, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.0)),
    (torch.optim.SGD, dict(lr=0.1)),
])
def test_functional_rules_match_torch_optimizers(make, kwargs):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    grads = [torch.randn(5, dtype=torch.float64, generator=g) for _ in range(4)]
    grads[0][0] = 0.0  # an exactly zero gradient element
    opt = make([p], **kwargs)
    rule = functional_rule(opt)
    q = p.detach().clone()
    state = rule.init(q)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for t, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        opt.step()
        q, state = rule.update(q, grad, state, t, hyper)
        assert torch.allclose(q, p.detach(), atol=1e-14, rtol=1e-12), t


def test_unsupported_settings_are_clear_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(InvalidInputError, match="RMSprop"):
        functional_rule(torch.optim.RMSprop(p))
    with pytest.raises(InvalidInputError, match="amsgrad"):
        functional_rule(torch.optim.Adam(p, amsgrad=True))
    net = tiny_net().eval()
    with pytest.raises(InvalidInputError, match="episodic"):
        DifferentiableDent(Dent(net, DentConfig(episodic=False)))
    with pytest.raises(InvalidInputError, match="Dent"):
        DifferentiableDent(net)
    short = shortened(Dent(net, DentConfig(steps=10, lr=0.1)), 2)
    assert short.config.steps == 2 and short.config.lr == 0.1 and short.model is net
    assert isinstance(short, nn.Module)
