"""The batch-mates attack: malicious inputs added to a batch against a batch-wise defense, and why a sample-wise
defense is unaffected by construction; its result accounting and its config."""

from __future__ import annotations

import pytest
import torch

from dent.attacks import ATTACKS, AttackSection
from dent.attacks.batch_mates import attack_mates, mates_label, submit
from dent.defenses import Dent, DentConfig
from dent.defenses.differentiable import DifferentiableDent
from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig
from eval_support import fake_data, tiny_net

#: Batch-wise dent that the tiny net's batch-mates can move (a large learning rate on the shared scale/shift).
ATTACKABLE = DentConfig(steps=3, lr=0.1)
#: Sample-wise dent+ as `dent serve` serves it (no diversity term), and the static model.
SAMPLE_WISE = {
    "dent_plus": DentConfig(preset="dent_plus_bsi", diversity_weight=0, steps=2),
    "static": DentConfig(steps=0),
}


def point(**adaptive):
    return AttackSection(name="batch_mates", threats=["Linf:8/255"], n_iter=[5], adaptive=adaptive).points()[0]


@pytest.fixture(scope="module")
def batch():
    net = tiny_net()
    data = fake_data(8, model=net)
    return net, data.images, data.labels


def answers(defense, x, malicious=None):
    with torch.no_grad():
        return (defense(x) if malicious is None else submit(defense, x, malicious)).argmax(1)


def test_malicious_batch_mates_flip_benign_answers_of_a_batch_wise_defense(batch):
    net, x, y = batch
    dent = Dent(net, ATTACKABLE)
    clean = int((answers(dent, x) == y).sum())
    res = attack_mates(dent, DifferentiableDent(dent), x, y, 4, n_iter=5, eps=None, seed=0)
    assert int((res.pred == y).sum()) < clean  # the benign inputs were never touched
    assert res.best_correct[0] == clean and len(res.best_correct) == 6  # the start, then one per step
    assert all(a >= b for a, b in zip(res.best_correct, res.best_correct[1:]))  # best so far
    assert res.malicious.shape == (4, *x.shape[1:]) and 0 <= res.malicious.min() and res.malicious.max() <= 1
    assert not res.zero_gradient


def test_bounded_malicious_inputs_stay_near_natural_images_of_the_batch(batch):
    net, x, y = batch
    dent = Dent(net, ATTACKABLE)
    eps = 16 / 255
    res = attack_mates(dent, DifferentiableDent(dent), x, y, 10, n_iter=2, eps=eps, seed=0)
    centers = x[torch.arange(10) % len(x)]  # more malicious inputs than benign ones: cycled
    assert (res.malicious - centers).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("name", list(SAMPLE_WISE))
def test_a_sample_wise_defense_answers_benign_inputs_as_alone_whatever_their_batch_mates(batch, name):
    net, x, y = batch
    config = SAMPLE_WISE[name]
    assert config.batch_couplings() == []
    dent = Dent(net, config)
    clean = answers(dent, x)
    g = torch.Generator().manual_seed(1)
    for malicious in (torch.rand(8, *x.shape[1:], generator=g), torch.zeros(1, *x.shape[1:]),
                      torch.ones(3, *x.shape[1:]), x.flip(0)):
        assert torch.equal(answers(dent, x, malicious), clean)
    res = attack_mates(dent, DifferentiableDent(dent), x, y, 4, n_iter=5, eps=None, seed=0)
    assert torch.equal(res.pred, clean)
    assert res.zero_gradient and len(res.best_correct) == 1  # exactly zero: the attack stops at its start


@pytest.mark.parametrize("config", [ATTACKABLE, SAMPLE_WISE["dent_plus"]], ids=["batch-wise", "sample-wise"])
def test_benign_flags_are_the_defenses_answers_on_the_submitted_batch(batch, config):
    net, x, y = batch
    dent = Dent(net, config)
    out = ATTACKS.get("batch_mates")(dent, x, y, point(batch_mates=[2, 4]), device="cpu", seed=0)
    assert list(out.robust) == [mates_label(2, 8), mates_label(4, 8)] == ["batch mates 2/10", "batch mates 4/12"]
    for k, label in zip((2, 4), out.robust):
        res = attack_mates(dent, DifferentiableDent(dent), x, y, k, n_iter=5, eps=None, seed=0)
        resubmitted = answers(dent, x, res.malicious)
        assert torch.equal(out.pred[label], resubmitted) and torch.equal(out.robust[label], resubmitted == y)
        assert torch.equal(out.x_adv[label], x)  # benign inputs are unperturbed: inside any eps ball
        assert out.notes["malicious_share"][label] == [k, 8 + k]
        assert out.notes["best_benign_correct"][label] == res.best_correct
    assert out.notes["malicious"]["eps"] is None and out.notes["malicious"]["n_iter"] == 5


def test_batch_mates_config_keys_labels_and_errors():
    p = EvaluateConfig.load(None, ["attack.name", "batch_mates", "attack.adaptive.batch_mates", "[1, 4]",
                                   "attack.adaptive.batch_mates_eps", "8/255", "attack.adaptive.horizon", "2"]
                            ).attack.points()[0]
    assert p.adaptive.batch_mates == [1, 4] and p.adaptive.batch_mates_eps == pytest.approx(8 / 255)
    assert p.adaptive.horizon is None  # not read by batch_mates: reset, out of its unit key
    assert "BATCH_MATES(mates 1,4 within 8/255)" in p.label
    # Other attacks' points (and the committed stores' unit keys) do not carry the new keys.
    mixed = EvaluateConfig.load(None, ["attack.name", "mixed", "attack.adaptive.batch_mates", "[3]"]).attack.points()[0]
    assert not {"batch_mates", "batch_mates_eps"} & set(mixed.to_dict()["adaptive"])
    default = EvaluateConfig.load(None, ["attack.name", "batch_mates"]).attack.points()[0]
    assert default.adaptive.batch_mates == [1, 2, 4, 8] and "batch_mates" not in default.to_dict()["adaptive"]
    for value, message in [("[0, 2]", "must be >= 1, got \\[0\\]"), ("[2, 2]", "listed twice"),
                           ("[]", "at least one count")]:
        with pytest.raises(ConfigError, match=message):
            EvaluateConfig.load(None, ["attack.name", "batch_mates", "attack.adaptive.batch_mates", value])
    with pytest.raises(ConfigError, match="batch_mates_eps"):
        EvaluateConfig.load(None, ["attack.name", "batch_mates", "attack.adaptive.batch_mates_eps", "0"])


def test_batch_mates_from_python_and_on_a_non_dent_model(batch):
    from dent.attacks.adaptive import adaptive_attack
    from dent.errors import InvalidInputError

    net, x, y = batch
    out = adaptive_attack(Dent(net, ATTACKABLE), x, y, "batch_mates", eps=8 / 255, n_iter=2, batch_mates=[1])
    assert list(out.robust) == ["batch mates 1/9"]
    with pytest.raises(InvalidInputError, match="Dent"):
        ATTACKS.get("batch_mates")(net, x, y, point(), device="cpu", seed=0)
