"""Carlini & Wagner: the minimal-L2 attack (cw_l2) and PGD's logit-margin loss (attack.loss margin), on toy
models whose exact minimal distance is known and on a distillation-like saturated softmax."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from dent.attacks import ATTACKS, AttackPoint, AttackSection, cw_l2, pgd
from dent.attacks.masking import logits_and_plain_gradient
from dent.attacks.wrappers import PlainGradient
from dent.defenses.protocol import Preprocessed
from dent.defenses.transforms import BitDepth
from dent.errors import ConfigError, InvalidInputError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.report import load_summary, write_report
from dent.evaluation.rundir import find_store
from dent.evaluation.runner import evaluate
from dent.evaluation.store import ResultStore

from eval_support import fake_data, tiny_net


class TwoClassLinear(nn.Module):
    """Logits ``temperature * (s, -s)`` with ``s = w . (x - 0.5)``. The boundary is ``s = 0``, so a point's exact
    minimal L2 distance to it is ``|s| / ||w||_2``. A huge temperature mimics defensive distillation: the float32
    softmax saturates and the cross-entropy gradient is exactly zero at correctly classified points."""

    def __init__(self, w: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.w = w
        self.temperature = temperature

    def forward(self, x):
        s = ((x - 0.5).flatten(1) * self.w).sum(dim=1)
        return self.temperature * torch.stack([s, -s], dim=1)


#: Per toy point, its offset from 0.5 along +-w (pixel scale): its distance to the boundary is offset * ||w||_2.
OFFSETS = torch.tensor([2.0, 4.0, 6.0, 3.0]) / 255


def toy(temperature: float = 1.0):
    """The model, 4 correctly classified points (classes 0, 1, 0, 1) at OFFSETS from the boundary, and their
    exact minimal L2 distances (all inside the [0, 1] box)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 2, (3 * 8 * 8,), generator=g).float() * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    sign = 1 - 2 * y.float()  # class 0: s > 0
    x = 0.5 + OFFSETS[:, None] * sign[:, None] * w[None]
    return TwoClassLinear(w, temperature), x.view(4, 3, 8, 8), y, OFFSETS * w.norm()


def attack(name: str, model, x, y, **section):
    (point,) = AttackSection(name=name, **section).points()
    return ATTACKS.get(name)(model, x, y, point, device="cpu", seed=0)


@pytest.mark.parametrize("temperature, pgd_loss", [(1.0, "ce"), (1000.0, "margin")])
def test_cw_finds_a_smaller_l2_perturbation_than_pgd_within_a_few_percent_of_the_exact_minimum(temperature, pgd_loss):
    model, x, y, exact = toy(temperature)
    found = cw_l2(model, x, y, n_iter=100, search_steps=9)
    assert torch.isfinite(found.l2).all()
    assert torch.allclose(found.l2, (found.x_adv - x).flatten(1).norm(dim=1))
    with torch.no_grad():
        assert (model(found.x_adv).argmax(1) != y).all()
    assert (found.l2 >= exact - 1e-4).all() and (found.l2 <= 1.03 * exact).all()
    res = pgd(model, x, y, norm="L2", eps=0.5, n_iter=10, loss=pgd_loss, seed=0)
    assert not res.robust.any()  # PGD breaks every point too, but farther away
    assert (found.l2 < (res.x_adv - x).flatten(1).norm(dim=1)).all()


def test_cw_l2_robust_flag_respects_eps_and_notes_the_norms():
    model, x, y, exact = toy()
    out = attack("cw_l2", model, x, y, threats=["L2:0.2"], n_iter=[100])
    assert out.robust["cw_l2"].tolist() == (exact > 0.2).tolist() == [False, True, True, False]
    assert torch.equal(out.pred["cw_l2"] == y, out.robust["cw_l2"])  # broken points submit their adversarial
    assert out.notes["l2"] == pytest.approx(exact.tolist(), rel=0.03)
    assert out.notes["median_l2"] == pytest.approx(statistics.median(exact.tolist()), rel=0.03)
    assert out.notes["budget"] == {"n_iter": 100, "search_steps": 9, "initial_const": 1e-3, "confidence": 0.0,
                                   "lr": 1e-2}
    far = attack("cw_l2", model, x, y, threats=["L2:0.05"], n_iter=[100])
    assert far.robust["cw_l2"].all() and torch.equal(far.pred["cw_l2"], y)  # the clean inputs, submitted
    wrong = attack("cw_l2", model, x, 1 - y, threats=["L2:0.05"], n_iter=[10], cw={"search_steps": 1})
    assert not wrong.robust["cw_l2"].any()  # misclassified already: found at (about) zero distance


def test_cw_l2_attacks_a_non_differentiable_defense_through_its_declared_surrogate():
    """Rounding's gradient is zero, so C&W on the plain gradient finds nothing; the runner takes the BPDA view
    the defense's declarations call for and finds adversarials near the (rounding-shifted) exact distance."""
    model, x, y, exact = toy()
    defense = Preprocessed(BitDepth(8), model)
    assert torch.isinf(cw_l2(PlainGradient(defense), x, y, n_iter=20, search_steps=2).l2).all()
    out = attack("cw_l2", defense, x, y, threats=["L2:0.5"], n_iter=[50], cw={"search_steps": 5})
    assert out.notes["view"]["bpda"] is True
    assert not out.robust["cw_l2"].any()
    assert all(found <= 1.2 * d for found, d in zip(out.notes["l2"], exact.tolist()))


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_margin_pgd_breaks_a_saturated_softmax_that_cross_entropy_pgd_cannot(norm, eps):
    distilled, x, y, _ = toy(temperature=1000.0)
    _, gradient = logits_and_plain_gradient(distilled, x, y)
    assert gradient["zero"] == len(x)  # the softmax saturates in float32: the CE gradient is exactly 0
    threat = [f"{norm}:{eps}"]
    ce = attack("pgd", distilled, x, y, threats=threat, n_iter=[10])
    margin = attack("pgd", distilled, x, y, threats=threat, n_iter=[10], loss="margin")
    assert ce.robust["pgd"].all() and not margin.robust["pgd"].any()
    undistilled, *_ = toy()
    assert not attack("pgd", undistilled, x, y, threats=threat, n_iter=[10]).robust["pgd"].any()  # CE works at T=1


def test_margin_and_cw_points_keep_the_unit_keys_of_other_attacks():
    (ce,) = AttackSection(name="pgd").points()
    (margin,) = AttackSection(name="pgd", loss="margin", n_restarts=3).points()
    (cw,) = AttackSection(name="cw_l2", threats=["L2:0.5"], cw={"search_steps": 5}).points()
    (aa,) = AttackSection().points()
    assert "loss" not in ce.to_dict() and "cw" not in ce.to_dict() and "cw" not in aa.to_dict()
    assert margin.to_dict()["loss"] == "margin" and margin.label == "PGDx3-margin Linf 8/255"
    assert AttackSection(name="pgd", loss="margin").points()[0].label == "PGD-margin Linf 8/255"
    assert cw.to_dict()["cw"]["search_steps"] == 5 and cw.label == "CW_L2 L2 0.5"
    assert AttackSection(name="cw_l2", threats=["L2:0.5"]).points()[0].cw.search_steps == 9  # defaults, explicit


def cfg(*overrides: str):
    return EvaluateConfig.load(None, list(overrides))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"attack.loss margin is read only by attack.name pgd; attack.name "
                                          r"autoattack ignores it.*apgd-dlr"):
        cfg("attack.loss", "margin")
    with pytest.raises(ConfigError, match="attack.loss.*'ce' or 'margin'"):
        cfg("attack.name", "pgd", "attack.loss", "hinge")
    with pytest.raises(ConfigError, match="attack.cw is read only by attack.name cw_l2; attack.name pgd ignores it"):
        cfg("attack.name", "pgd", "attack.cw.search_steps", "3")
    with pytest.raises(ConfigError, match="cw_l2 is an L2 attack, but attack.threats has Linf 8/255"):
        cfg("attack.name", "cw_l2", "attack.threats", "[L2:0.5, Linf:8/255]")
    model, x, y, _ = toy()
    linf = AttackPoint(name="cw_l2", norm="Linf", eps=8 / 255)  # past the config check, e.g. from Python
    with pytest.raises(InvalidInputError, match="threat norm must be L2, got Linf"):
        ATTACKS.get("cw_l2")(model, x, y, linf, device="cpu", seed=0)


def test_evaluate_cw_l2_end_to_end(tmp_path):
    """The harness plans, runs, reports and resumes a cw_l2 evaluation."""
    net = tiny_net()
    data = fake_data(8, model=net)
    cfg = EvaluateConfig.model_validate({
        "device": "cpu", "data": {"n_images": 8, "batch_size": 8}, "evaluation": {"progress": False},
        "defenses": {"static": {"steps": 0}},
        "attack": {"name": "cw_l2", "threats": ["L2:0.5"], "n_iter": [10], "cw": {"search_steps": 2}},
    })
    run = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert run.n_run == 2  # clean and attack units
    (row,) = load_summary([run.run_dir]).rows
    (label,) = row.attacks
    assert label == "CW_L2 L2 0.5 iter=10" and row.attacks[label].worst.n == 8
    text = write_report([run.run_dir], tmp_path / "report").text
    assert "CW_L2, 2 search steps from c 0.001" in text
    with ResultStore(find_store(run.run_dir), create=False) as store:
        (result,) = [r.result for r in store.records() if r.kind != "clean"]
    assert len(result["notes"]["l2"]) == 8 and "median_l2" in result["notes"]
    again = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert again.n_skipped == 2 and again.n_run == 0  # resumable by unit key
