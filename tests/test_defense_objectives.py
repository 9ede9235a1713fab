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
