"""PGD: norm balls, pixel range, restarts (worst case per point), queries of a dynamic model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent.attacks import pgd
from dent.defenses import Dent, DentConfig
from eval_support import fake_data, tiny_net


class Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        return self.model(x)


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    data = fake_data(16, model=net)
    return net, data.images, data.labels


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_stays_in_ball_and_pixel_range(setup, norm, eps):
    net, x, y = setup
    res = pgd(net, x, y, norm=norm, eps=eps, n_iter=5, n_restarts=2, seed=1)
    delta = (res.x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.robust.dtype == torch.bool and res.pred.shape == y.shape


def test_breaks_points_and_predictions_match(setup):
    net, x, y = setup
    res = pgd(net, x, y, eps=32 / 255, n_iter=10, seed=0)
    assert (~res.robust).sum() > 0  # a large radius breaks some points of a random net
    with torch.no_grad():
        pred = net(res.x_adv).argmax(1)
    # A static model: the stored example reproduces the recorded prediction.
    assert torch.equal(pred, res.pred)
    assert torch.equal(res.robust, res.pred == y)


def test_restarts_keep_the_worst_case(setup):
    net, x, y = setup
    one = pgd(net, x, y, eps=16 / 255, n_iter=3, n_restarts=1, seed=3)
    three = pgd(net, x, y, eps=16 / 255, n_iter=3, n_restarts=3, seed=3)
    # The first restart is the same run; more restarts can only break more points.
    assert not (three.robust & ~one.robust).any()
    assert three.robust.sum() <= one.robust.sum()


def test_deterministic_given_seed(setup):
    net, x, y = setup
    a = pgd(net, x, y, eps=8 / 255, n_iter=3, seed=5)
    b = pgd(net, x, y, eps=8 / 255, n_iter=3, seed=5)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.robust, b.robust)


def test_queries_the_dynamic_model_on_the_whole_batch_every_step(setup):
    net, x, y = setup
    model = Counting(Dent(net, DentConfig(steps=1)))
    pgd(model, x, y, eps=8 / 255, n_iter=4, n_restarts=2, seed=0)
    # clean query + per restart (n_iter gradient queries + the final iterate)
    assert model.calls == [len(x)] * (1 + 2 * (4 + 1))


def test_clean_errors_count_as_broken(setup):
    net, x, y = setup
    wrong = (y + 1) % 10
    res = pgd(net, x, wrong, eps=1 / 255, n_iter=1, random_start=False, seed=0)
    assert not res.robust.any()


def test_bad_input_shapes():
    net = tiny_net()
    from dent.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        pgd(net, torch.rand(3, 8, 8), torch.zeros(3, dtype=torch.long), eps=0.1)
