"""The Dent wrapper: adaptation semantics, isolation of the wrapped model, gradients, input validation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dent.defenses import Dent, DentConfig
from dent.errors import ConfigError, InvalidInputError

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than multi-threaded on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(seed=0, dtype=torch.float64):
    """A small BN convnet with non-trivial BN parameters and running statistics, left in *train* mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BN):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100)
    return net.to(dtype)


def batch(n=6, seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.rand(n, 3, 8, 8, dtype=dtype)


def eval_logits(net, x):
    reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        return reference(x)


def entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def snapshot(net):
    """Everything a call must leave as it was."""
    return dict(
        state={k: v.clone() for k, v in net.state_dict(keep_vars=True).items()},
        modes=[(name, m.training) for name, m in net.named_modules()],
        structure=[(name, id(m)) for name, m in net.named_modules()],
        requires_grad=[p.requires_grad for p in net.parameters()],
        grads=[p.grad for p in net.parameters()],
    )


def assert_unchanged(net, before):
    after = snapshot(net)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype and torch.equal(after["state"][key], value), key
    for field in ("modes", "structure", "requires_grad"):
        assert after[field] == before[field], field
    assert all(g is None for g in after["grads"])


CONFIGS = {
    "dent": DentConfig(steps=3),
    "dent+": DentConfig(steps=3, affine="sample", optimizer="adamod", lr=6e-3, betas=(0.99, 0.999), beta3=0.6,
                        objective="infomax"),
    "batch-stats+blur": DentConfig(steps=3, stats="batch", input="batch"),
    "sample-blur-sgd": DentConfig(steps=3, affine="sample", input="sample", optimizer="sgd", momentum=0.9, lr=0.1),
    "continual": DentConfig(steps=3, episodic=False, input="batch"),
}


# --- what a call computes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [DentConfig(steps=0), DentConfig(steps=0, affine="sample", input="none"), DentConfig(affine="none", steps=5)],
    ids=["steps0", "steps0-sample", "nothing-to-adapt"],
)
def test_no_adaptation_gives_exactly_the_wrapped_models_logits(config):
    net, x = tiny_net(), batch()
    assert torch.equal(Dent(net, config)(x), eval_logits(net, x))


def test_batch_stats_without_steps_is_test_time_normalization():
    net, x = tiny_net(), batch()
    reference = copy.deepcopy(net).eval()
    for m in reference.modules():
        if isinstance(m, BN):
            m.train()  # batch statistics (this copy's running buffers get updated; the original's must not)
    with torch.no_grad():
        expected = reference(x)
    before = snapshot(net)
    torch.testing.assert_close(Dent(net, DentConfig(steps=0, stats="batch"))(x), expected, rtol=0, atol=1e-12)
    assert_unchanged(net, before)


def reference_dent(net, x, steps, lr, stats="fixed"):
    """Batch-wise dent written out directly: a copy of the model, Adam over BN scale/shift only."""
    model = copy.deepcopy(net).eval()
    model.requires_grad_(False)
    affine = []
    for m in model.modules():
        if isinstance(m, BN):
            m.train(stats == "batch")
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            affine += [m.weight, m.bias]
    optimizer = torch.optim.Adam(affine, lr=lr)
    for _ in range(steps):
        loss = entropy(model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("stats", ["fixed", "batch"])
def test_batch_wise_dent_equals_a_direct_reference(stats):
    net, x = tiny_net(), batch()
    model = reference_dent(net, x, steps=4, lr=0.01, stats=stats)
    x_ref = x.clone().requires_grad_()
    expected = model(x_ref)
    (expected_grad,) = torch.autograd.grad(F.cross_entropy(expected, torch.arange(6) % 5), x_ref)

    x_dent = x.clone().requires_grad_()
    out = Dent(net, DentConfig(steps=4, lr=0.01, stats=stats))(x_dent)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    # The attacker's gradient is that of the adapted model: nothing from the adaptation steps leaks into it.
    F.cross_entropy(out, torch.arange(6) % 5).backward()
    torch.testing.assert_close(x_dent.grad, expected_grad, rtol=0, atol=1e-10)
    assert not torch.equal(out, eval_logits(net, x))  # adaptation did something


def test_sample_wise_equals_batch_wise_for_a_single_input():
    net, x = tiny_net(), batch(n=1)
    batch_wise = Dent(net, DentConfig(steps=3, lr=0.01))(x)
    sample_wise = Dent(net, DentConfig(steps=3, lr=0.01, affine="sample"))(x)
    torch.testing.assert_close(sample_wise, batch_wise, rtol=0, atol=1e-12)


@pytest.mark.parametrize("input_mode", ["none", "sample"])
def test_sample_wise_adaptation_is_independent_of_the_rest_of_the_batch(input_mode):
    net, x = tiny_net(), batch(n=6)
    dent = Dent(net, DentConfig(steps=5, lr=0.01, affine="sample", stats="fixed", input=input_mode))
    together = dent(x)
    for i in range(6):
        torch.testing.assert_close(dent(x[i : i + 1]), together[i : i + 1], rtol=0, atol=1e-5)
    other = [4, 0, 2]
    torch.testing.assert_close(dent(x[other]), together[other], rtol=0, atol=1e-5)
    assert not torch.allclose(together, eval_logits(net, x), atol=1e-4)


@pytest.mark.parametrize("name", ["dent", "dent+"])
def test_more_steps_give_lower_entropy(name):
    net, x = tiny_net(), batch(n=8)
    entropies = [entropy(Dent(net, CONFIGS[name].replace(steps=steps, lr=0.02))(x)).item() for steps in (0, 1, 3, 10)]
    assert entropies == sorted(entropies, reverse=True) and entropies[-1] < entropies[0] - 1e-3, entropies


def test_input_adaptation_learns_sigma():
    net, x = tiny_net(), batch()
    static = Dent(net, DentConfig(affine="none", input="static", steps=0))(x)
    dynamic = Dent(net, DentConfig(affine="none", input="batch", steps=3))(x)
    assert not torch.allclose(static, dynamic, atol=1e-6)  # so d(loss)/d(sigma) was non-zero
    assert entropy(dynamic) < entropy(static)


def test_vanishing_static_blur_is_the_identity():
    net, x = tiny_net(), batch()
    out = Dent(net, DentConfig(steps=0, input="static", sigma_init=1e-4))(x)
    torch.testing.assert_close(out, eval_logits(net, x), rtol=0, atol=1e-12)


# --- the wrapped model is left exactly as it was -----------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_wrapped_model_is_bit_identical_after_a_call(name):
    net, x = tiny_net(), batch()
    net[1].eval()  # mixed modes must be restored module by module
    net[0].weight.requires_grad_(False)  # and so must requires_grad flags
    before = snapshot(net)
    x = x.requires_grad_()
    F.cross_entropy(Dent(net, CONFIGS[name])(x), torch.zeros(6, dtype=torch.long)).backward()
    assert x.grad is not None
    assert_unchanged(net, before)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_the_adapted_tensors_change_during_adaptation(name):
    net, x = tiny_net(), batch()
    before = snapshot(net)
    live = net.state_dict(keep_vars=True)  # the model's own tensors (names differ while BNs are swapped)
    seen = []

    def check(module, inputs, output):  # at the end of every forward, during adaptation and prediction
        seen.append(True)
        for key, value in live.items():
            assert torch.equal(value, before["state"][key]), key  # weights and running statistics
        for param in net.parameters():
            assert not param.requires_grad and param.grad is None  # no weight gradients are computed

    net[-1].register_forward_hook(check)
    Dent(net, CONFIGS[name])(x)
    assert len(seen) == 4  # 3 adaptation steps + the prediction


class FailingHead(nn.Module):
    def forward(self, x):
        raise RuntimeError("the head failed")


def test_model_is_restored_when_its_forward_fails():
    net = tiny_net()
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="the head failed"):  # after the BatchNorms were swapped
        Dent(nn.Sequential(net, FailingHead()), DentConfig(steps=2))(batch())
    assert_unchanged(net, before)


def test_shared_batchnorm_stays_shared():
    torch.manual_seed(0)
    shared = nn.BatchNorm2d(3)
    net = nn.Sequential(shared, nn.Conv2d(3, 3, 1), shared, nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x = batch()
    expected = reference_dent(net, x, steps=3, lr=0.01)(x)
    torch.testing.assert_close(Dent(net, DentConfig(steps=3, lr=0.01))(x), expected, rtol=0, atol=1e-10)
    assert net[0] is shared and net[2] is shared


# --- state across calls ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dent", "dent+", "batch-stats+blur", "sample-blur-sgd"])
def test_episodic_calls_do_not_depend_on_earlier_batches(name):
    net = tiny_net()
    x, others = batch(seed=1), [batch(seed=s, n=n) for s, n in ((2, 6), (3, 4), (4, 2))]
    first = Dent(net, CONFIGS[name])(x)
    dent = Dent(net, CONFIGS[name])
    for other in others:
        dent(other)
    assert torch.equal(dent(x), first)


def test_continual_adaptation_carries_over_until_reset():
    net, x = tiny_net(), batch()
    dent = Dent(net, CONFIGS["continual"])
    first = dent(x)
    second = dent(x)
    assert entropy(second) < entropy(first)  # kept adapting from where the first call stopped
    dent.reset()
    assert torch.equal(dent(x), first)
    assert torch.equal(Dent(net, CONFIGS["continual"])(x), first)


def test_the_tent_style_constructor_is_the_config_constructor_with_tent_s_defaults():
    net, x = tiny_net(), batch()
    tented = Dent.tent_style(net, "sgd", steps=2, lr=0.01, momentum=0.9)  # tent: Tent(model, optimizer, steps=2)
    assert tented.config == DentConfig(optimizer="sgd", steps=2, episodic=False, lr=0.01, momentum=0.9)
    configured = Dent(net, DentConfig(optimizer="sgd", steps=2, episodic=False, lr=0.01, momentum=0.9))
    assert torch.equal(tented(x), configured(x)) and torch.equal(tented(x), configured(x))  # both continual
    assert Dent.tent_style(net).config.steps == 1 and not Dent.tent_style(net).config.episodic
    with pytest.raises(ConfigError, match="unknown optimizer 'sgdd'.*valid names: adam"):
        Dent.tent_style(net, "sgdd")


# --- calling conventions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dent", "dent+", "sample-blur-sgd"])
def test_adapts_under_no_grad_and_inference_mode(name):
    net, x = tiny_net(), batch()
    expected = Dent(net, CONFIGS[name])(x)
    with torch.no_grad():
        under_no_grad = Dent(net, CONFIGS[name])(x)
    with torch.inference_mode():
        under_inference = Dent(net, CONFIGS[name])(x)
    assert torch.equal(under_no_grad, expected) and torch.equal(under_inference, expected)
    assert not under_no_grad.requires_grad


@pytest.mark.parametrize("name", list(CONFIGS))
def test_input_gradient_is_finite_and_nonzero(name):
    net, x = tiny_net(), batch().requires_grad_()
    out = Dent(net, CONFIGS[name])(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, torch.arange(6) % 5), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_graphs_of_earlier_calls_stay_valid():
    # e.g. an EOT attack summing the losses of several calls before one backward pass
    net, x = tiny_net(), batch().requires_grad_()
    dent = Dent(net, CONFIGS["continual"])
    loss = dent(x).sum() + dent(x).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_float32_model():
    net, x = tiny_net(dtype=torch.float32), batch(dtype=torch.float32)
    out = Dent(net, CONFIGS["dent+"])(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- bad inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 8, 8, dtype=torch.float64), r"shape \[B, C, H, W\], got a 3-D tensor of shape \[3, 8, 8\]"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.float64), r"non-empty batch, got shape \[0, 3, 8, 8\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r"floating-point pixel values in \[0, 1\], got dtype torch.uint8"),
        (torch.full((2, 3, 8, 8), float("nan"), dtype=torch.float64), r"finite pixel values, got 384 NaN/Inf"),
        (torch.full((2, 3, 8, 8), float("inf"), dtype=torch.float64), r"finite pixel values, got 384 NaN/Inf"),
        (torch.full((2, 3, 8, 8), 255.0, dtype=torch.float64), r"values in \[0, 1\], got values in \[255, 255\]"),
        (torch.full((2, 3, 8, 8), -0.5, dtype=torch.float64), r"values in \[0, 1\], got values in \[-0.5, -0.5\]"),
    ],
    ids=["3d", "empty", "uint8", "nan", "inf", "0-255", "negative"],
)
def test_bad_inputs_are_rejected_with_a_useful_message(x, message):
    with pytest.raises(InvalidInputError, match=message):
        Dent(tiny_net())(x)


def test_pixel_rounding_is_tolerated():
    x = batch()
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1 + 1e-7, -1e-7
    Dent(tiny_net())(x)


def test_batch_statistics_on_a_single_image_use_its_spatial_statistics():
    """The paper's Table 9 runs batch statistics at batch size 1: conv BatchNorms normalize over H x W."""
    x = batch(n=1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)
    ).double()
    with torch.no_grad():
        expected = copy.deepcopy(net).train()(x)
    assert torch.allclose(Dent(net, DentConfig(stats="batch", steps=0))(x), expected)
    assert torch.isfinite(Dent(net, DentConfig(stats="batch", steps=2))(x)).all()


def test_batch_statistics_need_more_than_one_value_per_channel():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(InvalidInputError, match=r"BatchNorm1d\(4\) sees a single value per channel"):
        Dent(net, DentConfig(stats="batch"))(batch(n=1))


def no_bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize(
    "model, config, message",
    [
        (no_bn_net(), DentConfig(), r"affine='batch' .* has no BatchNorm layer with affine parameters"),
        (
            nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            DentConfig(affine="sample"),
            r"affine='sample' .* has no BatchNorm layer with affine parameters",
        ),
        (no_bn_net(), DentConfig(affine="none", stats="batch"), r"stats='batch' .* has no BatchNorm layer"),
    ],
    ids=["no-bn", "bn-without-affine", "stats-without-bn"],
)
def test_models_without_batchnorm_are_rejected_when_batchnorm_is_needed(model, config, message):
    with pytest.raises(InvalidInputError, match=message):
        Dent(model, config)


def test_input_only_adaptation_works_without_batchnorm():
    net, x = no_bn_net(), batch()
    out = Dent(net, DentConfig(affine="none", input="batch", steps=3))(x)
    assert out.shape == (6, 3) and not torch.allclose(out, net(x))
