"""Test-time objectives."""

import math

import pytest
import torch

from dent.defenses import OBJECTIVES, DentConfig
from dent.errors import UnknownNameError


def logits(seed=0):
    torch.manual_seed(seed)
    return 3 * torch.randn(6, 5, dtype=torch.float64)


def test_entropy_matches_the_definition():
    z = logits()
    p = z.softmax(dim=1)
    expected = -(p * p.log()).sum(dim=1).mean()
    torch.testing.assert_close(OBJECTIVES.get("entropy")(z, DentConfig()), expected)


def test_entropy_extremes():
    entropy = OBJECTIVES.get("entropy")
    torch.testing.assert_close(entropy(torch.zeros(2, 7, dtype=torch.float64), DentConfig()), torch.tensor(math.log(7), dtype=torch.float64))
    confident = torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float64)
    assert entropy(confident, DentConfig()).item() < 1e-40


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_infomax_is_entropy_minus_weighted_diversity(weight):
    z = logits()
    p = z.softmax(dim=1)
    mean = p.mean(dim=0)
    expected = -(p * p.log()).sum(dim=1).mean() + weight * (mean * mean.log()).sum()
    got = OBJECTIVES.get("infomax")(z, DentConfig(objective="infomax", diversity_weight=weight))
    torch.testing.assert_close(got, expected)


def test_infomax_prefers_diverse_batches():
    # Two equally confident batches: all inputs on one class, or spread over classes.
    collapsed = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    diverse = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    infomax, config = OBJECTIVES.get("infomax"), DentConfig(objective="infomax")
    assert infomax(diverse, config) < infomax(collapsed, config)


def test_unknown_objective_lists_valid_names():
    with pytest.raises(UnknownNameError, match=r"did you mean entropy.*valid names: entropy, infomax"):
        OBJECTIVES.get("entropi")


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_shot_is_the_official_loss_with_its_constant(weight):
    z = logits()
    p = z.softmax(dim=1)
    mean = p.mean(dim=0)
    # DequanWang/dent's shot(): -sum(p log(p + 1e-5), 1).mean(0) + sum(pm log(pm + 1e-5)), diversity weighted
    expected = -(p * torch.log(p + 1e-5)).sum(dim=1).mean() + weight * (mean * torch.log(mean + 1e-5)).sum()
    got = OBJECTIVES.get("shot")(z, DentConfig(objective="shot", diversity_weight=weight))
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_shot_differs_from_the_exact_log_infomax_by_its_constant():
    z = logits()
    config = DentConfig(diversity_weight=1.0)
    gap = (OBJECTIVES.get("shot")(z, config) - OBJECTIVES.get("infomax")(z, config)).abs().item()
    assert 1e-8 < gap < 1e-3
