"""The ``attack`` config section: threats, epsilon ranges, attack names, the grid of attack points."""

from __future__ import annotations

import math

import pytest

from dent.attacks import AAVersion, AttackSection, Threat
from dent.threat import ThreatModel, check_eps, format_eps
from dent.evaluation.config import EvaluateConfig
from dent.errors import ConfigError


def cfg(*overrides: str):
    return EvaluateConfig.load(None, list(overrides))


def test_threat_shorthands_and_fractions():
    c = cfg("attack.threats", "[Linf:1.5/255, L2:0.2, {norm: Linf, eps: 8/255}]")
    assert [(t.norm, t.eps) for t in c.attack.threats] == [
        (ThreatModel.LINF, pytest.approx(1.5 / 255)), (ThreatModel.L2, 0.2), (ThreatModel.LINF, pytest.approx(8 / 255))]
    assert cfg("attack.threats", "L2:0.5").attack.threats == [Threat(norm="L2", eps=0.5)]


@pytest.mark.parametrize("threat, message", [
    ("Linf:8", "out of range (0, 1]"),
    ("Linf:0", "must be > 0"),
    ("L2:-0.5", "must be > 0"),
    ("L3:0.5", "'Linf' or 'L2'"),
    ("8/255", "NORM:EPS"),
])
def test_bad_threats_are_clear_errors(threat, message):
    with pytest.raises(ConfigError, match="attack.threats") as err:
        cfg("attack.threats", threat)
    assert message in str(err.value)


def test_l2_epsilon_checked_against_input_size():
    check_eps(ThreatModel.L2, 55.0, dim=3 * 32 * 32)
    with pytest.raises(ValueError, match="out of range"):
        check_eps(ThreatModel.L2, 56.0, dim=3 * 32 * 32)


def test_unknown_attack_names():
    with pytest.raises(ConfigError, match="attack.name.*did you mean pgd"):
        cfg("attack.name", "pdg")
    with pytest.raises(ConfigError, match="unknown AutoAttack attack 'apgd-xx'.*apgd-ce"):
        cfg("attack.version", "custom", "attack.attacks", "[apgd-xx]")
    with pytest.raises(ConfigError, match="'standard', 'plus', 'rand' or 'custom'"):
        cfg("attack.version", "strong")


def test_version_and_attack_list_must_agree():
    with pytest.raises(ConfigError, match="needs a list in attack.attacks"):
        cfg("attack.version", "custom")
    with pytest.raises(ConfigError, match="only used with attack.version custom"):
        cfg("attack.attacks", "[apgd-ce]")
    with pytest.raises(ConfigError, match="listed twice"):
        cfg("attack.version", "custom", "attack.attacks", "[apgd-ce, APGD-CE]")


def test_version_attack_lists():
    assert AttackSection().attack_list() == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert AttackSection(version="plus").attack_list() == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    assert AttackSection(version="rand").attack_list() == ("apgd-ce", "apgd-dlr")
    assert AttackSection(version="custom", attacks=["square"]).attack_list() == ("square",)
    assert AttackSection(name="pgd").attack_list() == ()


def test_points_are_threats_times_iterations():
    c = cfg("attack.threats", "[Linf:1/255, L2:0.2]", "attack.n_iter", "[5, 10]", "attack.n_target_classes", "1")
    points = c.attack.points()
    assert [(p.norm.value, p.n_iter) for p in points] == [("Linf", 5), ("Linf", 10), ("L2", 5), ("L2", 10)]
    assert all(p.version == AAVersion.STANDARD and p.n_target_classes == 1 for p in points)
    assert points[0].label == "AA-standard Linf 1/255 iter=5"
    assert cfg("attack.n_iter", "7").attack.n_iter == [7]
    assert [p.n_iter for p in cfg().attack.points()] == [None]


def test_pgd_points_and_labels():
    c = cfg("attack.name", "PGD", "attack.n_restarts", "3", "attack.step_size", "1/255")
    (p,) = c.attack.points()
    assert p.name == "pgd" and p.step_size == pytest.approx(1 / 255) and p.version is None
    assert p.label == "PGDx3 Linf 8/255"


def test_format_eps():
    assert format_eps(8 / 255, "Linf") == "8/255"
    assert format_eps(1.5 / 255, "Linf") == "1.5/255"
    assert format_eps(0.01, "Linf") == "0.01"
    assert format_eps(0.5, "L2") == "0.5"
    assert not math.isnan(Threat().eps)
