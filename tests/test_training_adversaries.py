"""Training adversaries: examples stay in the epsilon ball and in [0, 1]; randomness is seeded; augmentation."""

from __future__ import annotations

import pytest
import torch

from dent.attacks.ball import project, random_start
from dent.training.adversaries import fgsm_rs_examples, pgd_examples, trades_examples
from dent.training.augment import random_crop_flip
from training_support import one_thread, tiny_net  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("Linf", 8 / 255), ("L2", 0.5)]


def batch(n: int = 12, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[: n // 3] = (x[: n // 3] > 0.5).float()  # saturated pixels exercise the [0, 1] box
    return x, torch.arange(n) % 10


def assert_in_ball(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float) -> None:
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size.max().item()


@pytest.mark.parametrize("norm,eps", CASES)
@pytest.mark.parametrize("kind", ["pgd", "fgsm_rs", "trades"])
def test_examples_stay_in_ball_and_box(kind, norm, eps):
    torch.manual_seed(0)
    model = tiny_net()
    x, y = batch()
    g = torch.Generator().manual_seed(1)
    if kind == "pgd":
        x_adv = pgd_examples(model, x, y, norm=norm, eps=eps, step=eps / 4, steps=5, generator=g)
    elif kind == "fgsm_rs":
        x_adv = fgsm_rs_examples(model, x, y, norm=norm, eps=eps, generator=g)
    else:
        x_adv = trades_examples(model, x, norm=norm, eps=eps, step=eps / 4, steps=5, generator=g)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert_in_ball(x, x_adv, norm, eps)
    assert (x_adv != x).any()
    assert all(p.grad is None for p in model.parameters())  # only the input was differentiated
    assert model.training  # the model's mode is restored


@pytest.mark.parametrize("norm,eps", CASES)
def test_projection_and_random_start(norm, eps):
    x, _ = batch()
    far = x + 10 * torch.randn_like(x)
    assert_in_ball(x, project(x, far, norm, eps), norm, eps)
    starts = [random_start(x, norm, eps, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
    assert_in_ball(x, starts[0], norm, eps)


def test_pgd_raises_the_loss_and_is_reproducible():
    torch.manual_seed(0)
    model = tiny_net().eval()
    x, y = batch()
    loss = lambda inp: torch.nn.functional.cross_entropy(model(inp), y).item()  # noqa: E731
    runs = [pgd_examples(model, x, y, steps=5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert loss(runs[0]) > loss(x)


def test_bn_mode_train_updates_running_stats_eval_does_not():
    torch.manual_seed(0)
    model = tiny_net()
    x, y = batch()
    before = model[1].running_mean.clone()
    pgd_examples(model, x, y, steps=2, bn_mode="eval")
    assert torch.equal(model[1].running_mean, before)
    pgd_examples(model, x, y, steps=2, bn_mode="train")
    assert not torch.equal(model[1].running_mean, before)


def test_random_crop_flip():
    x, _ = batch(n=8, size=8)
    same = [random_crop_flip(x, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(same[0], same[1]) and same[0].shape == x.shape
    assert not torch.equal(same[0], x)
    assert torch.equal(random_crop_flip(x, torch.Generator(), padding=0, flip=False), x)
    # every output window is a crop of the zero-padded image, possibly mirrored
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        found = any(
            torch.equal(same[0][i], win) or torch.equal(same[0][i], win.flip(2))
            for t in range(9) for l in range(9) for win in [padded[i, :, t : t + 8, l : l + 8]]
        )
        assert found
