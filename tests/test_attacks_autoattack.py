"""The pyautoattack wrapper: budget overrides, modes, the dynamic-defense warning and re-batching."""

from __future__ import annotations

import logging

import pytest
import torch

from dent.attacks import AttackSection
from dent.attacks.autoattack import build_autoattack, run_autoattack
from dent.defenses import Dent, DentConfig
from eval_support import fake_data, tiny_net


def point(**kw):
    return AttackSection(**kw).points()[0]


def test_budget_overrides_reach_the_attack_objects():
    net = tiny_net()
    p = point(version="custom", attacks=["apgd-ce", "apgd-t", "fab-t", "square"], n_iter=[10], n_restarts=2,
              n_target_classes=3, n_queries=50)
    aa = build_autoattack(net, p, list(p.attacks), device="cpu", seed=0)
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa.apgd.n_iter == 10 and aa.apgd_targeted.n_iter == 10 and aa.fab.n_iter == 10
    # APGD derives its step-size schedule from n_iter in its constructor: it must follow the override.
    assert aa.apgd.n_iter_2 == 2 and aa.apgd.n_iter_min == 1 and aa.apgd.size_decr == 1
    assert aa.apgd.n_restarts == 2 and aa.fab.n_restarts == 2
    assert aa.apgd_targeted.n_target_classes == 3 and aa.fab.n_target_classes == 3
    assert aa.square.n_queries == 50


def test_standard_version_keeps_its_settings():
    net = tiny_net()
    p = point()  # standard
    aa = build_autoattack(net, p, list(p.attacks), device="cpu", seed=0)
    assert aa.version == "standard" and aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa.apgd.n_iter == 100 and aa.apgd.n_restarts == 1 and aa.square.n_queries == 5000


@pytest.fixture(scope="module")
def batch():
    net = tiny_net()
    data = fake_data(16, model=net)
    return net, data.images, data.labels


def test_modes_and_worst_case_labels(batch):
    net, x, y = batch
    p = point(version="custom", attacks=["apgd-ce", "apgd-t"], mode="both", threats=["Linf:16/255"],
              n_iter=[3], n_target_classes=1, n_restarts=1)
    out = run_autoattack(net, x, y, p, device="cpu", seed=0)
    assert list(out.robust) == ["apgd-ce", "apgd-t", "ensemble"]
    for flags in out.robust.values():
        assert flags.dtype == torch.bool and flags.shape == y.shape
    # For a static model the ensemble is the conjunction of its attacks run one by one.
    both = out.robust["apgd-ce"] & out.robust["apgd-t"]
    assert torch.equal(out.robust["ensemble"], both)
    assert torch.equal(out.robust["ensemble"], out.pred["ensemble"] == y)


def test_dynamic_warning_and_rebatching_are_recorded(batch, caplog):
    net, x, y = batch
    p = point(version="custom", attacks=["apgd-ce", "apgd-t"], threats=["Linf:16/255"], n_iter=[3],
              n_target_classes=1, n_restarts=1)
    dynamic = run_autoattack(Dent(net, DentConfig(steps=1)), x, y, p, device="cpu", seed=0)
    assert dynamic.notes["dynamic_warning"]
    assert any("dynamic defense" in w for w in dynamic.notes["warnings"])
    sizes = dynamic.notes["attacked_batch_sizes"]["ensemble"]
    assert sizes["apgd-ce"] == [len(x)]
    n_left = int(dynamic.robust["ensemble"].sum()) if "apgd-t" not in sizes else sizes["apgd-t"][0]
    assert n_left <= len(x)  # the second attack only sees the points still robust after the first
    # pyautoattack never resets its dynamic-check counters; we do, so a static model is not flagged after.
    static = run_autoattack(net, x, y, p, device="cpu", seed=0)
    assert not static.notes["dynamic_warning"]
    # Our capture does not leave the logger changed.
    assert logging.getLogger("auto-attack").level == logging.NOTSET


def test_deterministic(batch):
    net, x, y = batch
    p = point(version="custom", attacks=["apgd-ce"], threats=["Linf:16/255"], n_iter=[3], n_restarts=1)
    model = Dent(net, DentConfig(steps=1))
    a = run_autoattack(model, x, y, p, device="cpu", seed=0)
    b = run_autoattack(model, x, y, p, device="cpu", seed=0)
    assert torch.equal(a.robust["ensemble"], b.robust["ensemble"])
    assert torch.equal(a.pred["ensemble"], b.pred["ensemble"])
