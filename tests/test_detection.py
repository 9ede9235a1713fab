"""Detection: the reject convention, detection metrics and the three detectors (issue #15)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dent.confbase import validated
from dent.defenses.detection import (
    FeatureSqueezing, KernelDensityUncertainty, LogisticRegression, NotFittedError, Rejecting, SubnetworkDetector,
    predictions_with_reject, reject_logits, rejects, threshold_at_fpr,
)
from dent.defenses.detection.layers import run_capturing
from dent.defenses.kinds import build_defense, parse_defense
from dent.defenses.protocol import Preprocessed, Traits, bpda_surrogate, traits_of
from dent.defenses.transforms import JPEG
from dent.errors import ConfigError, InvalidInputError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.detection import (
    Proportion, clean_accuracy_with_reject, robust_accuracy_with_reject, roc_auc, tpr_at_fpr, worst_case_with_reject,
)
from dent.evaluation.summary import wilson_interval

from eval_support import tiny_net


def smooth_images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """Low-frequency images in [0.2, 0.8]: squeezing them barely changes them."""
    g = torch.Generator().manual_seed(seed)
    coarse = 0.2 + 0.6 * torch.rand(n, 3, 2, 2, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def perturbed(images: torch.Tensor, strength: float = 0.2) -> torch.Tensor:
    """The separable 'adversarial' fixture: a large checkerboard on top of the clean images."""
    h, w = images.shape[2:]
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1
    return (images + strength * board).clamp(0, 1)


def high_pass_net() -> nn.Module:
    """tiny_net with four Laplacian filters among its first convolutions: its last hidden layer sees the
    checkerboard (a random tiny_net's hardly does), so density and uncertainty separate the fixture."""
    net = tiny_net()
    laplacian = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    with torch.no_grad():
        net[0].weight[:4], net[0].bias[:4] = 0.0, 0.0
        for channel in range(4):
            net[0].weight[channel, channel % 3] = laplacian
    return net


def held_out_scores(detector: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of clean and perturbed images the detector was neither fitted nor calibrated on."""
    return detector.score(smooth_images(30, seed=3)), detector.score(perturbed(smooth_images(30, seed=4)))


def pairwise_auc(clean, adversarial) -> float:
    """The AUC by its definition: P(adversarial score > clean score) + P(equal) / 2 over all pairs."""
    c = torch.as_tensor(clean, dtype=torch.float64)[None, :]
    a = torch.as_tensor(adversarial, dtype=torch.float64)[:, None]
    return float(((a > c).double() + 0.5 * (a == c).double()).mean())


# -- the reject convention --------------------------------------------------------------------------------

@pytest.mark.parametrize("logits", [
    [[2.0, 5.0, 1.0]], [[-7.0, -3.0, -9.0]], [[-1.0, 0.0, 1.0]], [[4.0, 4.0, -1.0]], [[0.0, 0.0, 0.0]],
    [[1e8, 3.0, 2.0]],  # 1e8 + 1e-6 == 1e8 in float32: the reject logit is forced one float step above
])
@pytest.mark.parametrize("d", [-5.0, -1e-6, 0.0, 1e-30, 1e-6, 3.0])
def test_argmax_is_the_reject_class_exactly_when_the_detector_fires(logits, d):
    z = torch.tensor(logits)
    g = reject_logits(z, torch.tensor([d]))
    assert g.shape == (1, 4) and torch.equal(g[:, :3], z)
    predicted, rejected = predictions_with_reject(g)
    assert bool(rejected) == (d > 0)  # negative logits, ties (d = 0: the class wins) and tiny d included
    assert int(predicted) == int(z.argmax())  # the classifier's label stays readable when rejected


def test_reject_logits_are_differentiable_in_both_parts_and_check_shapes():
    z = torch.randn(5, 3, requires_grad=True)
    d = torch.randn(5, requires_grad=True)
    reject_logits(z, d, scale=2.0)[:, 3].sum().backward()
    assert torch.equal(d.grad, torch.full((5,), 2.0)) and z.grad.abs().sum() > 0
    with pytest.raises(InvalidInputError, match=r"logits \[B, K\] and a detector logit \[B\]"):
        reject_logits(torch.zeros(2, 3), torch.zeros(3))


def calibrated_squeezing(net: nn.Module) -> FeatureSqueezing:
    detector = FeatureSqueezing.standard(net, bits=5, median_size=2)
    detector.calibrate(smooth_images(40, seed=1), fpr=0.05)
    return detector


def test_rejecting_declares_traits_rejects_and_a_bpda_surrogate():
    net = tiny_net()
    defense = Rejecting(net, calibrated_squeezing(net))
    assert rejects(defense) and rejects(Preprocessed(JPEG(), defense)) and not rejects(net)
    assert traits_of(defense) == Traits(differentiable=False, randomized=False, adaptive=False, cost=1 + 3.05)
    x = perturbed(smooth_images(6, seed=2)).requires_grad_(True)
    surrogate = bpda_surrogate(defense)
    assert traits_of(surrogate).differentiable
    assert torch.allclose(surrogate(x), defense(x), atol=1e-6)  # same answers, a useful gradient
    surrogate(x)[:, -1].sum().backward()
    assert x.grad.abs().sum() > 0
    kde = Rejecting(net, KernelDensityUncertainty(net, passes=4))
    assert traits_of(kde).randomized and traits_of(kde).differentiable

    class Odd(nn.Module):
        rejects = "yes"

    with pytest.raises(InvalidInputError, match=r"Odd\.rejects must be True or False"):
        rejects(Odd())
    with pytest.raises(InvalidInputError, match="scale must be > 0"):
        Rejecting(net, defense.detector, scale=0)


# -- metrics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clean, adversarial, expected", [
    ([0.1, 0.4], [0.35, 0.8], 0.75),  # sklearn's roc_auc_score docstring example ([0, 0, 1, 1], these scores)
    ([0.5, 0.5], [0.5, 1.0], 0.75),  # ties count one half: (0.5 + 0.5 + 1 + 1) / 4
    ([1.0, 1.0, 1.0], [1.0, 1.0], 0.5),
    ([0.0, 0.1], [0.2, 0.3, 0.4], 1.0),
    ([2.0], [1.0], 0.0),
])
def test_roc_auc_by_hand(clean, adversarial, expected):
    assert roc_auc(torch.tensor(clean), torch.tensor(adversarial)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_with_many_ties_equals_the_pairwise_definition_and_mann_whitney():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 6, (50,), generator=g).float()
    adversarial = torch.randint(2, 9, (37,), generator=g).float()
    auc = roc_auc(clean, adversarial)
    assert auc == pytest.approx(pairwise_auc(clean, adversarial), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    u = stats.mannwhitneyu(adversarial.numpy(), clean.numpy(), alternative="two-sided").statistic
    assert auc == pytest.approx(u / (50 * 37), abs=1e-12)


def test_roc_auc_equals_sklearn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed; see test_roc_auc_by_hand")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 6, (40,), generator=g).float()
    adversarial = torch.randint(2, 9, (30,), generator=g).float()
    expected = metrics.roc_auc_score([0] * 40 + [1] * 30, torch.cat([clean, adversarial]).numpy())
    assert roc_auc(clean, adversarial) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_interval_is_hanley_mcneil_by_hand():
    from dent.evaluation.detection import roc_auc_interval

    # A = 0.8, 50 + 50: Q1 = 0.8 / 1.2, Q2 = 1.28 / 1.8; SE^2 = (0.16 + 49 (Q1 - 0.64) + 49 (Q2 - 0.64)) / 2500
    se = math.sqrt((0.16 + 49 * (0.8 / 1.2 - 0.64) + 49 * (1.28 / 1.8 - 0.64)) / 2500)
    assert se == pytest.approx(0.0445, abs=1e-4)
    assert roc_auc_interval(0.8, 50, 50) == pytest.approx((0.8 - 1.96 * se, 0.8 + 1.96 * se), abs=1e-4)
    assert roc_auc_interval(1.0, 10, 10) == (1.0, 1.0) and roc_auc_interval(0.99, 5, 5)[1] == 1.0  # clipped
    with pytest.raises(InvalidInputError, match="needs an AUC in \\[0, 1\\] and at least one input of each kind"):
        roc_auc_interval(0.5, 0, 3)


def test_roc_auc_refuses_empty_or_nan_scores():
    with pytest.raises(InvalidInputError, match="adversarial scores: expected at least one score"):
        roc_auc(torch.ones(3), torch.tensor([]))
    with pytest.raises(InvalidInputError, match="clean scores: .*all finite"):
        roc_auc(torch.tensor([float("nan")]), torch.ones(2))


def test_threshold_is_the_inverted_cdf_quantile_and_tpr_counts_scores_strictly_above():
    clean = torch.arange(100).flip(0).double()  # 0..99, unsorted
    assert threshold_at_fpr(clean, 0.05) == 94.0  # exactly 5 clean scores (95..99) above it: FPR 5%
    for fpr in (0.0, 0.01, 0.05, 0.123, 0.5):
        threshold = threshold_at_fpr(clean, fpr)
        assert threshold == np.quantile(clean.numpy(), 1 - fpr, method="inverted_cdf")
        assert (clean > threshold).double().mean() <= fpr
    # where fpr * n is an integer, exactly that many above (numpy's 1 - 0.99 = 0.01000...009 would allow 98)
    assert threshold_at_fpr(clean, 0.99) == 0.0 and threshold_at_fpr(clean, 0.29) == 70.0
    assert threshold_at_fpr(torch.tensor([0.0, 1.0, 2.0]), 0.05) == 2.0  # fpr * n < 1: nothing clean rejected
    assert threshold_at_fpr(torch.tensor([1.0] * 10 + [3.0] * 10), 0.25) == 3.0  # ties: fewer rejected, not more
    tpr = tpr_at_fpr(clean, torch.tensor([93.0, 94.0, 94.5, 200.0]), fpr=0.05)
    assert (tpr.count, tpr.n, tpr.value) == (2, 4, 0.5) and tpr.interval == wilson_interval(2, 4)
    with pytest.raises(InvalidInputError, match=r"fpr must be in \[0, 1\)"):
        threshold_at_fpr(clean, 1.0)


def test_accuracy_with_reject_counts_a_rejected_clean_input_as_an_error_and_a_rejected_attack_as_defended():
    labels = torch.tensor([0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 0, 0])  # right, right, wrong, wrong
    rejected = torch.tensor([False, True, False, True])
    clean = clean_accuracy_with_reject((predicted, rejected), labels)
    assert (clean.count, clean.n) == (1, 4)  # only the correct, accepted one
    robust = robust_accuracy_with_reject((predicted, rejected), labels)
    assert (robust.count, robust.n) == (3, 4)  # all but the wrong, accepted one
    assert robust.interval == wilson_interval(3, 4) and Proportion(3, 4).value == 0.75
    with pytest.raises(InvalidInputError, match="of one shape"):
        robust_accuracy_with_reject((predicted, rejected[:3]), labels)


def test_worst_case_with_reject_needs_every_attack_defended_and_optionally_the_clean_input():
    labels = torch.tensor([0, 1, 2, 3])
    first = (torch.tensor([0, 0, 2, 0]), torch.tensor([False, True, False, False]))  # defended: 0, 1, 2
    second = (torch.tensor([1, 1, 2, 3]), torch.tensor([True, False, False, False]))  # defended: all
    third = (torch.tensor([0, 1, 0, 3]), torch.tensor([False, False, True, False]))  # defended: all
    worst = worst_case_with_reject([first, second, third], labels)
    assert (worst.count, worst.n) == (3, 4)
    clean = (torch.tensor([0, 1, 2, 3]), torch.tensor([True, False, False, False]))  # point 0 rejected when clean
    assert worst_case_with_reject([first, second], labels, clean=clean).count == 2
    with pytest.raises(InvalidInputError, match="at least one attack"):
        worst_case_with_reject([], labels)


# -- detectors ------------------------------------------------------------------------------------------------

def test_feature_squeezing_separates_the_fixture_and_calibrates_at_the_fpr():
    net = tiny_net()
    detector = calibrated_squeezing(net)
    calibration = smooth_images(40, seed=1)
    with torch.no_grad():
        assert (detector(calibration) > 0).double().mean() <= 0.05
        clean, adversarial = held_out_scores(detector)
    auc = roc_auc(clean, adversarial)
    assert auc >= 0.95 and auc == pytest.approx(pairwise_auc(clean, adversarial), abs=1e-12)
    assert tpr_at_fpr(detector.score(calibration).detach(), adversarial, 0.05).value >= 0.9


def test_detectors_used_before_training_or_calibration_say_so():
    net = tiny_net()
    x = smooth_images(2, seed=0)
    with pytest.raises(NotFittedError, match="FeatureSqueezing is not calibrated: .*calibrate\\(clean_images, fpr\\)"):
        FeatureSqueezing.standard(net)(x)
    with pytest.raises(NotFittedError, match="KernelDensityUncertainty has no trained checkpoint: call its fit"):
        KernelDensityUncertainty(net, passes=4).score(x)
    with pytest.raises(NotFittedError, match="SubnetworkDetector has no trained checkpoint"):
        SubnetworkDetector(net, "2", input_shape=(3, 8, 8)).score(x)
    with pytest.raises(NotFittedError, match="LogisticRegression is not fitted"):
        LogisticRegression(2)(torch.zeros(1, 2))


def test_feature_squeezing_kind_builds_from_a_config_with_its_threshold():
    net = tiny_net()
    threshold = calibrated_squeezing(net).threshold.item()
    config = validated(EvaluateConfig, {"defenses": {"fs": {"kind": "feature_squeezing", "threshold": threshold}}})
    defense = build_defense(net, config.defenses["fs"])
    assert isinstance(defense, Rejecting) and rejects(defense)
    x = perturbed(smooth_images(8, seed=4))
    with torch.no_grad():
        logits = defense(x)
        expected = calibrated_squeezing(net)(x) > 0
    assert logits.shape == (8, 11) and torch.equal(predictions_with_reject(logits)[1], expected)
    assert config.defenses["fs"].to_dict() == {"kind": "feature_squeezing", "bits": 5, "median_size": 2, "fpr": 0.05,
                                               "threshold": threshold}


def test_feature_squeezing_kind_without_a_threshold_or_with_bad_keys_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"config key 'threshold' is null, the detector is not calibrated"):
        build_defense(tiny_net(), parse_defense({"kind": "feature_squeezing", "fpr": 0.01}))
    for entry, message in [({"bits": 0}, r"'defenses\.d\.bits'.*greater than or equal to 1"),
                           ({"median_size": 16}, r"'defenses\.d\.median_size'.*less than or equal to 15"),
                           ({"fpr": 1.0}, r"'defenses\.d\.fpr'.*less than 1"),
                           ({"threshold": "nan"}, r"'defenses\.d\.threshold'")]:
        with pytest.raises(ConfigError, match=message):
            validated(EvaluateConfig, {"defenses": {"d": {"kind": "feature_squeezing", **entry}}})


def test_logistic_regression_separates_a_separable_fixture():
    g = torch.Generator().manual_seed(0)
    negatives = torch.randn(40, 2, generator=g) * torch.tensor([1.0, 100.0])
    positives = negatives + torch.tensor([6.0, 0.0])  # separable along the first feature only
    features, labels = torch.cat([negatives, positives]), torch.cat([torch.zeros(40), torch.ones(40)])
    regression = LogisticRegression(2).fit(features, labels)
    assert torch.equal(regression(features.double()) > 0, labels.bool())
    assert regression.weight[0] > 0 and abs(regression.weight[1]) < regression.weight[0]
    with pytest.raises(InvalidInputError, match="both classes"):
        LogisticRegression(2).fit(features, torch.zeros(80))


def fitted_kde(net: nn.Module) -> KernelDensityUncertainty:
    torch.manual_seed(0)
    train = smooth_images(60, seed=10)
    detector = KernelDensityUncertainty(net, bandwidth=0.5, passes=8)
    return detector.fit(train, torch.arange(60) % 10, smooth_images(30, seed=11), perturbed(smooth_images(30, seed=12)))


def test_kde_uncertainty_detector_separates_the_fixture_and_round_trips_its_state():
    detector = fitted_kde(high_pass_net())
    assert float(detector.threshold) == 0.0  # the regression's decision boundary
    density, uncertainty = detector.regression.weight.tolist()
    assert density < 0 < uncertainty  # adversarial: lower density, higher uncertainty
    with torch.no_grad():
        clean, adversarial = held_out_scores(detector)
    assert roc_auc(clean, adversarial) >= 0.95
    fresh = KernelDensityUncertainty(tiny_net(seed=1), bandwidth=0.5, passes=8)  # its weights come from the state
    fresh.load_state_dict(detector.state_dict())
    x = perturbed(smooth_images(5, seed=5))
    with torch.no_grad():
        torch.manual_seed(1)
        before = detector(x)
        torch.manual_seed(1)
        assert torch.equal(fresh(x), before)


def test_mc_dropout_inserts_dropout_on_the_last_hidden_layer_or_uses_the_models_own():
    x = smooth_images(6, seed=0)
    net = tiny_net()
    detector = KernelDensityUncertainty(net, passes=16)
    with torch.no_grad():
        _, hidden = run_capturing(net, net[5], x, "input")
    assert detector.head_name == "5" and not detector.own_dropout and detector.cost == 1.0
    assert (detector.uncertainty(x, hidden) > 0).all()
    with_dropout = nn.Sequential(*list(tiny_net())[:5], nn.Dropout(0.5), nn.Linear(32, 10)).eval()
    own = KernelDensityUncertainty(with_dropout, passes=16)
    assert own.own_dropout and own.cost == 17.0
    assert (own.uncertainty(x, hidden) > 0).all() and not with_dropout[5].training  # eval mode restored


def test_kde_fit_needs_every_class_and_a_linear_head():
    net = tiny_net()
    with pytest.raises(InvalidInputError, match=r"every class 0\.\.9; got 10 labels, classes missing: \[9\]"):
        KernelDensityUncertainty(net, passes=4).fit_density(smooth_images(10, seed=0), torch.arange(10) % 9)
    with pytest.raises(InvalidInputError, match="has no nn.Linear layer"):
        KernelDensityUncertainty(nn.Sequential(nn.Flatten()), passes=4)
    scaled = nn.Sequential(net, nn.Softmax(dim=1))  # something after the last linear layer
    with pytest.raises(InvalidInputError, match="does not produce its logits"):
        KernelDensityUncertainty(scaled, passes=4).fit_density(smooth_images(10, seed=0), torch.arange(10))


def test_subnetwork_detector_on_a_hidden_layer_separates_the_fixture_and_round_trips():
    torch.manual_seed(0)
    net = tiny_net()
    detector = SubnetworkDetector(net, "2", input_shape=(3, 8, 8), width=8)
    before = [p.clone() for p in net.parameters()]
    detector.fit(smooth_images(40, seed=20), perturbed(smooth_images(40, seed=21)), epochs=30, lr=1e-2, batch_size=16)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the model is frozen
    with torch.no_grad():
        clean, adversarial = held_out_scores(detector)
    assert roc_auc(clean, adversarial) >= 0.95
    fresh = SubnetworkDetector(tiny_net(seed=1), "2", input_shape=(3, 8, 8), width=8)
    fresh.load_state_dict(detector.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(smooth_images(4, seed=5)), detector(smooth_images(4, seed=5)))
    vector = SubnetworkDetector(net, "4", input_shape=(3, 8, 8))  # flattened features: a linear subnetwork
    assert isinstance(vector.net[0], nn.Linear)


def test_calibrated_threshold_round_trips_and_non_differentiable_models_are_refused_by_gradient_detectors():
    net = tiny_net()
    fresh = FeatureSqueezing.standard(tiny_net(seed=1))
    fresh.load_state_dict(calibrated_squeezing(net).state_dict())
    assert fresh.calibrated and float(fresh.threshold) == float(calibrated_squeezing(net).threshold)
    quantized = Preprocessed(JPEG(), net)
    for build in (lambda: KernelDensityUncertainty(quantized, passes=4),
                  lambda: SubnetworkDetector(quantized, "model.2", input_shape=(3, 8, 8))):
        with pytest.raises(InvalidInputError, match=r"needs a differentiable model to read, got Preprocessed"):
            build()


def test_unknown_hidden_layer_lists_the_models_layers():
    with pytest.raises(InvalidInputError, match=r"Sequential has no layer 'relu'; its layers \(named_modules\): "
                                                r"0, 1, 2, 3, 4, 5"):
        SubnetworkDetector(tiny_net(), "relu", input_shape=(3, 8, 8))


def detector_config(attack: dict) -> EvaluateConfig:
    return EvaluateConfig.model_validate({
        "device": "cpu", "data": {"n_images": 8, "batch_size": 8}, "evaluation": {"progress": False},
        "defenses": {"squeezed": {"kind": "feature_squeezing", "threshold": 0.5}},
        "attack": {"threats": ["Linf:8/255"], "n_iter": [2], **attack},
    })


def test_evaluate_refuses_attacks_that_do_not_know_the_reject_class(tmp_path):
    """Their attacked accuracies of a detector are refused, not guessed, before any unit runs."""
    from dent.evaluation.runner import evaluate
    from dent.evaluation.store import STORE_NAME, ResultStore
    from eval_support import fake_data, tiny_net

    net = tiny_net()
    data = fake_data(8, model=net)
    cfg = detector_config({"name": "declared_apgd", "n_target_classes": 1})
    with pytest.raises(ConfigError, match="attack.name declared_apgd does not know the reject class.*: pgd, cw_l2"):
        evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    with ResultStore(tmp_path / "run" / STORE_NAME, create=False) as store:
        assert list(store.records()) == []  # refused up front: no unit computed for a run that cannot finish


def test_evaluate_attacks_a_detector_with_reject_aware_pgd(tmp_path):
    from dent.evaluation.report import load_summary
    from dent.evaluation.runner import evaluate
    from eval_support import fake_data, tiny_net

    net = tiny_net()
    data = fake_data(8, model=net)
    run = evaluate(detector_config({"name": "pgd", "loss": "margin"}), model=net, data=data, run_dir=tmp_path / "run")
    assert run.n_run == 2
    summary = load_summary([run.run_dir])
    (row,) = summary.rows
    assert row.defense == "squeezed" and all(pr.worst.n == 8 for pr in row.attacks.values())


def test_detection_notes_and_the_report_s_detection_rows_agree_with_the_stored_predictions(tmp_path):
    """The clean unit's reject margins are positive exactly where the clean prediction is the reject class; the
    report counts rejections, inputs fooling the classifier and their AUC / TPR from the units' notes."""
    from dent.evaluation.report import detection_rows, detection_table, load_summary
    from dent.evaluation.runner import evaluate
    from dent.evaluation.store import STORE_NAME, ResultStore
    from eval_support import fake_data, tiny_net

    net = tiny_net()
    data = fake_data(8, model=net)
    cfg = EvaluateConfig.model_validate({
        "device": "cpu", "data": {"n_images": 8, "batch_size": 8}, "evaluation": {"progress": False},
        "defenses": {"squeezed": {"kind": "feature_squeezing", "threshold": 0.0105}},  # some clean rejected
        "attack": {"name": "pgd", "threats": ["Linf:64/255"], "n_iter": [10], "gradient": "declared"},
    })
    run = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    with ResultStore(tmp_path / "run" / STORE_NAME, create=False) as store:
        clean = next(r for r in store.records() if r.kind == "clean").result
        attacked = next(r for r in store.records() if r.kind != "clean").result
    margins = clean["notes"]["detection"]["reject_margin"]
    assert [m > 0 for m in margins] == [p == 10 for p in clean["clean_pred"]]
    (row,) = detection_rows(load_summary([run.run_dir]))
    notes = attacked["notes"]["detection"]
    fooled = [m for m, c, y in zip(notes["reject_margin"], notes["classified"], attacked["labels"]) if c != y]
    assert row["n_clean"] == row["n_adversarial"] == 8 and row["clean_rejected"] == sum(m > 0 for m in margins)
    assert row["n_fooled"] == len(fooled) and row["fooled_rejected"] == sum(m > 0 for m in fooled)
    assert 0 < row["clean_rejected"] < 8 and fooled  # the fixture exercises both
    assert row["roc_auc"] == pytest.approx(roc_auc(torch.tensor(margins), torch.tensor(fooled)))
    assert row["roc_auc_interval"][0] <= row["roc_auc"] <= row["roc_auc_interval"][1]
    assert row["tpr"]["n"] == len(fooled)
    line = detection_table(load_summary([run.run_dir])).splitlines()[-1]
    assert f"/ squeezed | PGD-bpda/eot Linf 64/255 iter=10 | {row['clean_rejected']}/8 |" in line


def two_feature_detector():
    """A linear classifier on the first half of the pixels and a detector that fires when the input moves along
    another direction, on the other half, by more than half of what eps = 8/255 allows. Clean points sit at
    margin 4/255 per pixel: not rejected, and broken by moving the classifier's half alone."""
    from test_attacks_wrappers import Linear2

    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 2, (96,), generator=g).float() * 2 - 1
    w, v = torch.cat([half, torch.zeros(96)]), torch.cat([torch.zeros(96), half])

    class Direction(nn.Module):
        def forward(self, x):
            return ((x - 0.5).flatten(1) * v).sum(dim=1) - 0.5 * (8 / 255) * 96

    y = torch.tensor([0, 1, 0, 1])
    x = (0.5 + (4 / 255) * (1 - 2 * y.float())[:, None] * w[None]).view(4, 3, 8, 8)
    return Rejecting(Linear2(w), Direction()), x, y


def test_the_margin_that_treats_the_reject_class_like_the_label_breaks_what_cross_entropy_only_gets_rejected():
    """Carlini & Wagner 2017: cross-entropy on the K + 1 logits also raises the reject logit (it lowers p_y), so
    its adversarial inputs get rejected; the reject-aware margin lowers both and is neither rejected nor right."""
    from dent.attacks.pgd import pgd

    defense, x, y = two_feature_detector()
    with torch.no_grad():
        assert (defense(x).argmax(dim=1) == y).all()  # clean: classified, not rejected
    ce = pgd(defense, x, y, eps=8 / 255, n_iter=10, loss="ce", rejecting=True)
    margin = pgd(defense, x, y, eps=8 / 255, n_iter=10, loss="margin", rejecting=True)
    assert int(ce.robust.sum()) >= 2 and (ce.pred[ce.robust] == 2).all()  # rejected: defended
    assert not margin.robust.any() and (margin.pred != 2).all() and (margin.pred != y).all()
    # counted as if the reject class were one more wrong class, the same cross-entropy run would look successful
    assert not pgd(defense, x, y, eps=8 / 255, n_iter=10, loss="ce", rejecting=False).robust.any()


def test_the_reject_aware_margin_by_hand():
    from dent.attacks.pgd import logit_margin

    logits = torch.tensor([[3.0, 1.0, 0.0, 5.0], [0.0, 2.0, 1.0, -1.0]])  # K = 3 classes + reject
    y = torch.tensor([0, 1])
    assert logit_margin(logits, y).tolist() == [2.0, -1.0]  # the reject logit counts as a wrong class
    assert logit_margin(logits, y, rejecting=True).tolist() == [-4.0, -1.0]  # max(Z_y, Z_K) vs the others


def test_cw_l2_on_a_detector_finds_inputs_that_are_misclassified_and_not_rejected():
    from dent.attacks.cw import cw_l2

    defense, x, y = two_feature_detector()
    result = cw_l2(defense, x, y, n_iter=100, search_steps=5, initial_const=1.0, rejecting=True)
    with torch.no_grad():
        pred = defense(result.x_adv).argmax(dim=1)
    assert ((pred != y) & (pred != 2)).all()
    # the smallest such move: the classifier's 96 pixels by 4/255 each, L2 = sqrt(96) * 4/255 (a few % above)
    assert torch.all(result.l2 < 1.1 * math.sqrt(96) * 4 / 255)
