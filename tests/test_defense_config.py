"""DentConfig validation and the shipped defense configs."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dent.evaluation.config import EvaluateConfig
from dent.defenses import AffineMode, Dent, DentConfig, InputMode, StatsMode
from dent.errors import ConfigError

CFGS = Path(__file__).resolve().parents[1] / "cfgs"


def test_unknown_objective_and_optimizer_list_valid_names():
    with pytest.raises(ValidationError, match=r"unknown objective 'entropi' \(did you mean entropy\?\); valid names: entropy, infomax"):
        DentConfig(objective="entropi")
    with pytest.raises(ValidationError, match=r"unknown optimizer 'adamw'.*valid names: adam, adamod, adamod_official, sgd"):
        DentConfig(optimizer="adamw")


def test_bad_name_from_a_config_override_names_the_key():
    with pytest.raises(ConfigError, match=r"defenses\.dent\.optimizer.*valid names: adam, adamod, adamod_official, sgd"):
        EvaluateConfig.load(None, ["defenses.dent.optimizer", "rmsprop"])


def test_names_are_case_insensitive_and_canonical():
    config = DentConfig(optimizer="AdaMod", objective="InfoMax")
    assert (config.optimizer, config.objective) == ("adamod", "infomax")


def test_max_kernel_size_must_be_odd():
    with pytest.raises(ValidationError, match="must be odd"):
        DentConfig(max_kernel_size=8)


@pytest.mark.parametrize("changes", [dict(affine="sample"), dict(input="sample")])
def test_continual_adaptation_needs_batch_level_state(changes):
    with pytest.raises(ValidationError, match="episodic=False"):
        DentConfig(episodic=False, **changes)


def test_static_config():
    assert {name: d.steps for name, d in EvaluateConfig.load(CFGS / "static.yaml").defenses.items()} == {"static": 0}


def test_dent_config_is_the_papers_batch_wise_setting():
    defenses = EvaluateConfig.load(CFGS / "dent.yaml").defenses
    assert defenses["static"].steps == 0
    d = defenses["dent"]
    assert (d.affine, d.stats, d.input, d.objective, d.optimizer) == (
        AffineMode.BATCH, StatsMode.FIXED, InputMode.NONE, "entropy", "adam"
    )
    assert (d.lr, d.steps, d.weight_decay, d.episodic) == (1e-3, 10, 0.0, True)


def test_dent_plus_config_is_the_official_repositorys_setting():
    d = EvaluateConfig.load(CFGS / "dent_plus.yaml").defenses["dent_plus"]
    assert (d.affine, d.objective, d.optimizer, d.episodic) == (AffineMode.SAMPLE, "shot", "adamod_official", True)
    assert (d.lr, d.betas, d.beta3, d.steps, d.weight_decay) == (6e-3, (0.99, 0.999), 0.6, 6, 0.0)
    assert (d.sample_grad.value, d.bn_arithmetic.value, d.stats.value) == ("batch_mean", "folded", "fixed")


def test_dent_input_config_adapts_model_and_input_batch_wise():
    defenses = EvaluateConfig.load(CFGS / "dent_input.yaml").defenses
    d = defenses["dent_input"]
    assert (d.affine, d.input, d.steps, d.sigma_lr, d.lr) == (AffineMode.BATCH, InputMode.BATCH, 10, 0.25, 1e-3)
    assert (defenses["static_blur"].input, defenses["static_blur"].steps) == (InputMode.STATIC, 0)


@pytest.mark.parametrize("name", ["static", "dent", "dent_plus", "dent_input"])
def test_every_shipped_defense_runs(name):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.rand(4, 3, 8, 8)
    for config in EvaluateConfig.load(CFGS / f"{name}.yaml").defenses.values():
        out = Dent(model, config)(x)
        assert out.shape == (4, 3) and torch.isfinite(out).all()
