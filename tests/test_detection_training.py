"""Detectors fitted by `dent train` (recipes kde_detector, subnetwork_detector), stored with cards, used as the
defense kind `detector`; PGD with the declared gradient (BPDA / EOT); the report's detection table."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from dent.attacks.config import AttackSection
from dent.attacks.pgd import run_pgd
from dent.confbase import validated
from dent.defenses.detection import NotFittedError, Rejecting, rejects
from dent.defenses.detection.stored import load_detector, save_detector
from dent.defenses.kinds import build_defense, parse_defense, resolved_defense
from dent.errors import ConfigError, CorruptFileError, InvalidInputError
from dent.training.config import TrainConfig
from dent.training.detectors import export_detector, fit_detector
from dent.training.trainer import TrainData
from training_support import synthetic_split

COLORS = torch.tensor(list(itertools.product([0.2, 0.5, 0.8], repeat=3))[:10])


def color_classifier() -> nn.Module:
    """Nearest class color of the image's mean color (training_support.synthetic_split's classes), as a linear
    layer on the mean color: logits_k = s (2 c_k . m - |c_k|^2). Right on every clean image; PGD at 0.2 moves
    the mean past the boundary (0.15 away), so every pair is a successful adversarial example."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    with torch.no_grad():
        net[2].weight.copy_(20 * 2 * COLORS)
        net[2].bias.copy_(-20 * COLORS.square().sum(1))
    return net.eval()


def detector_config(recipe: str, *overrides: str) -> TrainConfig:
    return TrainConfig.load(None, [
        "model.arch", "tiny", "device", "cpu", "train.recipe", recipe, "train.batch_size", "20", "train.holdout",
        "40", "train.n_images", "60", "train.attack.eps", "0.2", "train.attack.steps", "5", "train.detector.passes",
        "8", "train.detector.epochs", "30", "train.detector.lr", "0.01", "train.detector.width", "8",
        "train.detector.bandwidth", "0.1", *overrides])


def tiny_data() -> TrainData:
    return TrainData(train=synthetic_split(60, seed=1, size=8), holdout=synthetic_split(40, seed=2, size=8))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Both detectors fitted around the color classifier: {recipe: (result, model)}."""
    root = tmp_path_factory.mktemp("detectors")
    out = {}
    for recipe, extra in (("kde_detector", ()), ("subnetwork_detector", ("train.detector.layer", "1"))):
        model = color_classifier()
        result = fit_detector(detector_config(recipe, *extra), data=tiny_data(), model=model, run_dir=root / recipe)
        out[recipe] = (result, model)
    return out


@pytest.mark.parametrize("recipe", ["kde_detector", "subnetwork_detector"])
def test_a_fitted_detector_is_calibrated_on_held_out_images_and_measured(fitted, recipe):
    result, _ = fitted[recipe]
    m = result.metrics
    assert m["n_fit_pairs"] == 60 and m["n_adversarial"] == 40 and m["n_clean"] == 40  # every pair successful
    assert m["roc_auc"] > 0.5 and 0 <= m["tpr"] <= 1 and "CPU capability" in m["machine"]
    low, high = m["roc_auc_interval"]
    assert low <= m["roc_auc"] <= high
    if recipe == "subnetwork_detector":  # deterministic: the calibration's own clean scores, so exactly at most 5%
        assert m["measured_fpr"] <= 0.05
    else:  # MC dropout: a fresh draw of the same clean images' scores, near the target
        assert m["measured_fpr"] <= 0.2
    stored = json.loads((result.run_dir / "metrics.json").read_text())
    assert stored["threshold"] == m["threshold"] and stored["config_hash"] == detector_config(recipe, *(
        ("train.detector.layer", "1") if recipe == "subnetwork_detector" else ())).result_hash()
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "train-adversarial.pt").is_file()


@pytest.mark.parametrize("recipe", ["kde_detector", "subnetwork_detector"])
def test_a_stored_detector_reloads_around_its_model_only(fitted, recipe, tmp_path):
    result, model = fitted[recipe]
    weights, card = export_detector(result.run_dir, "mine", directory=tmp_path)
    assert "Threshold" in card.read_text() and "ROC AUC" in card.read_text()
    loaded = load_detector(model, str(weights))
    x = synthetic_split(6, seed=3, size=8).images
    with torch.no_grad():
        torch.manual_seed(0)
        expected = result.detector(x)
        torch.manual_seed(0)
        assert torch.allclose(loaded(x), expected)
    assert loaded.state_dict().keys() == result.detector.state_dict().keys()
    other = color_classifier()
    with torch.no_grad():
        other[2].bias.add_(0.01)
    with pytest.raises(InvalidInputError, match="was trained on a model with weights digest .* train one for this"):
        load_detector(other, str(weights))


def test_resume_reuses_the_adversarial_examples_kept_in_the_run_directory(fitted):
    result, model = fitted["kde_detector"]
    kept = result.run_dir / "train-adversarial.pt"
    before = kept.stat().st_mtime_ns
    again = fit_detector(detector_config("kde_detector"), data=tiny_data(), model=model, run_dir=result.run_dir)
    assert kept.stat().st_mtime_ns == before  # not made again
    assert result.metrics["pgd_batches_resumed"] == 0 and again.metrics["pgd_batches_resumed"] == 3 + 2
    assert again.metrics["threshold"] == pytest.approx(result.metrics["threshold"], rel=1e-5, abs=1e-5)


def test_the_detector_kind_builds_a_rejecting_defense_keyed_by_the_file_digest(fitted, tmp_path):
    result, model = fitted["subnetwork_detector"]
    weights, _ = export_detector(result.run_dir, "sub", directory=tmp_path)
    config = parse_defense({"kind": "detector", "checkpoint": str(weights)})
    resolved = resolved_defense(config, "cpu")
    assert resolved.digest and len(resolved.digest) == 16 and config.digest is None
    defense = build_defense(model, resolved)
    assert isinstance(defense, Rejecting) and rejects(defense)
    with torch.no_grad():
        assert defense(synthetic_split(4, seed=3, size=8).images).shape == (4, 11)
    with pytest.raises(ConfigError, match="config key 'digest' is 0000000000000000, but the file's digest is"):
        resolved_defense(parse_defense({"kind": "detector", "checkpoint": str(weights), "digest": "0" * 16}), "cpu")


def test_a_detector_without_a_trained_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'checkpoint' is null, so there is no trained detector to use: train one"):
        build_defense(color_classifier(), parse_defense({"kind": "detector"}))
    with pytest.raises(ValueError, match="no trained detector 'nope': expected the name of a stored detector"):
        parse_defense({"kind": "detector", "checkpoint": "nope"})
    foreign = tmp_path / "foreign.safetensors"
    from dent.models.checkpoints import save_safetensors

    save_safetensors({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CorruptFileError, match="is not a dent detector file: its metadata lacks"):
        load_detector(color_classifier(), str(foreign))


def test_an_untrained_detector_is_not_saved():
    from dent.defenses.detection import SubnetworkDetector

    detector = SubnetworkDetector(color_classifier(), "1", input_shape=(3, 8, 8))
    with pytest.raises(NotFittedError, match="is not calibrated"):
        save_detector(detector, "subnetwork", {"layer": "1"}, __import__("pathlib").Path("/nonexistent/x"))


def test_detector_recipe_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="subnetwork_detector needs train.detector.layer"):
        detector_config("subnetwork_detector")
    with pytest.raises(ConfigError, match="train.detector applies to the recipes kde_detector, subnetwork_detector, "
                                          "not to train.recipe 'nominal'"):
        TrainConfig.load(None, ["train.recipe", "nominal", "train.detector.fpr", "0.1"])
    with pytest.raises(ConfigError, match="train.detector.fpr"):
        detector_config("kde_detector", "train.detector.fpr", "0")
    cfg = detector_config("subnetwork_detector", "train.detector.layer", "fc")
    with pytest.raises(ConfigError, match=r"train.detector.layer 'fc' is not a layer of tiny; its layers "
                                          r"\(named_modules\): 0, 1, 2"):
        fit_detector(cfg, data=tiny_data(), model=color_classifier(), run_dir=None)
    with pytest.raises(ConfigError, match="fits a detector: use dent.training.detectors.fit_detector"):
        from dent.training.trainer import train

        train(detector_config("kde_detector"))


def test_dent_train_help_names_every_recipe():
    from dent.cli.commands.train import DESCRIPTION
    from dent.training.recipes import RECIPES

    assert all(name in DESCRIPTION for name in RECIPES.names())


# -- PGD with the declared gradient -------------------------------------------------------------------


def pgd_point(**keys):
    return validated(AttackSection, {"name": "pgd", "threats": ["Linf:8/255"], "n_iter": [10], **keys}).points()[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_with_the_declared_gradient_averages_a_randomized_defense_s_draws(seed):
    from test_attacks_wrappers import NoisyGradient, toy_problem

    model, x, y = toy_problem()
    defense = NoisyGradient(model, noise=5.0)
    torch.manual_seed(seed)
    plain = run_pgd(defense, x, y, pgd_point(), device="cpu", seed=seed)
    torch.manual_seed(seed)
    declared = run_pgd(defense, x, y, pgd_point(gradient="declared", eot_iter=32), device="cpu", seed=seed)
    assert int(plain.robust["pgd"].sum()) >= 3 and not declared.robust["pgd"].any()
    assert declared.notes["view"]["eot_samples"] == 32 and "view" not in plain.notes


def test_attack_gradient_is_read_by_pgd_only():
    with pytest.raises(ValueError, match="attack.gradient declared is read only by attack.name pgd"):
        validated(AttackSection, {"name": "autoattack", "gradient": "declared"})
    assert pgd_point(gradient="declared").label.startswith("PGD-bpda/eot")
    from dent.identity import result_tree

    assert "gradient" not in result_tree(pgd_point())  # at its default: earlier PGD units keep their keys
    assert result_tree(pgd_point(gradient="declared"))["gradient"] == "declared"


def test_kept_adversarial_examples_of_another_attack_or_a_foreign_file_are_refused(fitted, tmp_path):
    result, model = fitted["kde_detector"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train-adversarial.pt").write_bytes((result.run_dir / "train-adversarial.pt").read_bytes())
    other = detector_config("kde_detector", "train.attack.eps", "0.1")
    with pytest.raises(ConfigError, match="were made for another model, data, train.attack, batch size or seed"):
        fit_detector(other, data=tiny_data(), model=model, run_dir=run_dir)
    (run_dir / "train-adversarial.pt").write_text("not a tensor file")
    with pytest.raises(CorruptFileError, match="cannot read the PGD examples kept in .*delete it"):
        fit_detector(other, data=tiny_data(), model=model, run_dir=run_dir)
