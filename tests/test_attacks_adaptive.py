"""Adaptive attacks: mixed-batch composition and accounting, full-batch APGD, BPDA, the runners, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent.attacks import ATTACKS, AttackSection
from dent.attacks.adaptive import BPDA, MixedBatch, mixed_groups, run_mixed
from dent.attacks.adaptive_config import AdaptiveSection, adv_count, mix_label
from dent.attacks.apgd_batch import apgd_batch
from dent.evaluation.config import EvaluateConfig
from dent.defenses import Dent, DentConfig
from dent.defenses.differentiable import DifferentiableDent
from dent.errors import ConfigError
from eval_support import fake_data, tiny_net


def point(**kw):
    return AttackSection(**kw).points()[0]


class Spy(nn.Module):
    """Classifies an input correctly iff it is (numerically) one of the natural images; records every batch.

    logit[label of nearest natural image] = 1 - 100 * distance to it, other logits 0: natural inputs are
    right, inputs moved by more than ~0.01 (any attack's random start) are wrong. Differentiable.
    """

    def __init__(self, natural: torch.Tensor, labels: torch.Tensor, n_classes: int = 10):
        super().__init__()
        self.natural, self.labels, self.n_classes = natural, labels, n_classes
        self.batches: list[torch.Tensor] = []

    def forward(self, x):
        self.batches.append(x.detach().clone())
        dist = (x.flatten(1)[:, None, :] - self.natural.flatten(1)[None]).abs().amax(dim=2)  # [B, N] Linf
        nearest = dist.argmin(dim=1)
        d = dist.gather(1, nearest[:, None]).squeeze(1)
        logits = torch.zeros(len(x), self.n_classes, dtype=x.dtype)
        return logits.index_put((torch.arange(len(x)), self.labels[nearest]), 1 - 100 * d)

    def n_perturbed(self, batch):
        dist = (batch.flatten(1)[:, None, :] - self.natural.flatten(1)[None]).abs().amax(dim=2)
        return int((dist.amin(dim=1) > 1e-6).sum())


def test_mixed_groups_cover_every_input_once_with_exact_counts():
    for batch, n_adv in [(16, 1), (10, 3), (8, 8), (7, 2), (128, 13)]:
        groups = mixed_groups(batch, n_adv)
        owned = [i for index, own in groups for i, o in zip(index, own) if o]
        assert sorted(owned) == list(range(batch))
        assert all(len(index) == n_adv == len(set(index)) for index, _ in groups)
    assert adv_count(1, 16) == 1 and adv_count(0.1, 128) == 13 and adv_count(0.5, 7) == 4 and adv_count(0.01, 8) == 1
    assert mix_label(1) == "1 adv" and mix_label(0.25) == "25%"


@pytest.mark.parametrize("mix, batch, expected_adv", [([1], 8, 1), ([0.25], 8, 2), ([0.5], 6, 3)])
def test_mixed_batches_hold_the_requested_share_and_score_only_the_adversarial_part(mix, batch, expected_adv):
    data = fake_data(8, seed=1)
    spy = Spy(data.images, data.labels)
    p = point(name="mixed", threats=["Linf:16/255"], n_iter=[2], n_target_classes=1,
              adaptive={"mixed": mix, "mixed_batch_size": batch, "attacks": ["apgd-ce", "apgd-t"]})
    out = run_mixed(spy, data.images, data.labels, p, device="cpu", seed=0)
    label = f"mixed {mix_label(mix[0])}"
    sizes = {len(b) for b in spy.batches}
    counts = {spy.n_perturbed(b) for b in spy.batches}
    # Every batch the defense saw has the mixed batch size (the last evaluation sub-batch may be smaller:
    # 8 = 6 + 2 at batch 6) and exactly the requested number of adversarial inputs, the rest natural;
    # 0 only in each attack's first query, the clean batch APGD starts from.
    assert sizes <= {batch, 8 % batch or batch}
    expected = {0, expected_adv} | ({adv_count(mix[0], 2)} if batch == 6 else set())
    assert counts == expected
    clean_queries = sum(spy.n_perturbed(b) == 0 for b in spy.batches)
    assert clean_queries == 2 * out.notes["mixed_batches"][label]  # one per attack (apgd-ce, apgd-t) and batch
    # The spy gets every natural input right and every perturbed one wrong: accuracy on the adversarial
    # part is 0 (counting the natural part would give > 0), one result per input.
    assert out.robust[label].shape == (8,) and not out.robust[label].any()
    assert (out.pred[label] != data.labels).all()
    assert out.notes["adversarial_per_batch"][label][0] == [expected_adv, batch]


def test_mixed_batch_module_composes_and_differentiates():
    natural = torch.rand(5, 3, 4, 4)
    seen = []
    mixed = MixedBatch(lambda b: seen.append(b) or b.flatten(1)[:, :3] * 2, natural, [1, 3])
    adv = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = mixed(adv)
    assert out.shape == (2, 3) and len(seen[0]) == 5
    assert torch.equal(seen[0][[0, 2, 4]], natural[[0, 2, 4]]) and torch.equal(seen[0][[1, 3]], adv.detach())
    out.sum().backward()
    assert adv.grad is not None and adv.grad.abs().sum() > 0


def test_apgd_batch_queries_whole_batches_and_finds_examples():
    data = fake_data(6, seed=2)
    spy = Spy(data.images, data.labels)
    for attack in ("apgd-ce", "apgd-dlr", "apgd-t"):
        spy.batches.clear()
        res = apgd_batch(spy, data.images, data.labels, attack=attack, eps=8 / 255, n_iter=3, n_restarts=2,
                         n_target_classes=2)
        assert {len(b) for b in spy.batches} == {6}
        assert not res.robust.any()
        assert (res.x_adv - data.images).abs().max() <= 8 / 255 + 1e-6
        assert len(res.runs) == (4 if attack == "apgd-t" else 2)


def test_bpda_answers_like_the_defense_with_the_approximation_gradient():
    net = tiny_net()
    dent = Dent(net, DentConfig(steps=3, lr=0.05))
    short = DifferentiableDent(Dent(net, DentConfig(steps=1, lr=0.05)))
    bpda = BPDA(dent, short)
    x = torch.rand(4, 3, 8, 8)
    xr = x.clone().requires_grad_(True)
    out = bpda(xr)
    with torch.no_grad():
        assert torch.allclose(out, dent(x))
    (g,) = torch.autograd.grad(out.sum(), xr)
    xr2 = x.clone().requires_grad_(True)
    (g_short,) = torch.autograd.grad(short(xr2).sum(), xr2)
    assert torch.allclose(g, g_short)


@pytest.fixture(scope="module")
def defended():
    net = tiny_net()
    data = fake_data(6, model=net)
    return Dent(net, DentConfig(steps=2, lr=0.05)), data.images, data.labels


@pytest.mark.parametrize("name, extra, labels", [
    ("through_adaptation", {"adaptive": {"horizon": 1, "checkpoint": True}}, ["apgd-ce", "apgd-t"]),
    ("bpda_eot", {"eot_iter": 2}, ["apgd-ce", "apgd-t"]),
    ("surrogate_transfer", {"n_restarts": 1}, ["static:apgd-t", "shortened:apgd-t"]),
    ("transfer", {"version": "custom", "attacks": ["apgd-ce", "apgd-t"], "mode": "both"},
     ["static:apgd-ce", "static:apgd-t", "static:ensemble"]),
])
def test_runners_report_per_point_results_checked_on_the_defense(defended, name, extra, labels):
    dent, x, y = defended
    p = point(name=name, threats=["Linf:32/255"], n_iter=[2], n_target_classes=1, **extra)
    out = ATTACKS.get(name)(dent, x, y, p, device="cpu", seed=0)
    assert list(out.robust) == labels
    for label in labels:
        robust, pred = out.robust[label], out.pred[label]
        assert robust.dtype == torch.bool and robust.shape == (6,) and pred.shape == (6,)
        assert not robust.all()  # at 32/255 every attack breaks some of the 6 points of this tiny net
        assert (pred[robust] == y[robust]).all()  # a robust point's reported answer is right
    if name == "through_adaptation":
        assert out.notes["gradient"]["differentiated_steps"] == 1 and out.notes["gradient"]["checkpoint"]
    if name == "transfer":
        assert set(out.notes["source_robust"]) == set(labels)


#: The runners whose inputs the defense answered as one whole batch: resubmitted, they give the reported answers.
WHOLE_BATCH = {"through_adaptation", "bpda_eot", "transfer"}


@pytest.mark.parametrize("name, extra", [
    ("through_adaptation", {"adaptive": {"horizon": 1}}),
    ("bpda_eot", {"eot_iter": 2}),
    ("surrogate_transfer", {"n_restarts": 1}),
    ("transfer", {"version": "custom", "attacks": ["apgd-ce", "apgd-t"], "mode": "both"}),
    ("mixed", {"adaptive": {"mixed": [0.5]}}),
])
def test_adaptive_attacks_return_their_adversarial_inputs_in_the_ball(defended, name, extra):
    dent, x, y = defended
    eps = 32 / 255
    out = ATTACKS.get(name)(dent, x, y, point(name=name, threats=["Linf:32/255"], n_iter=[2], n_target_classes=1,
                                              **extra), device="cpu", seed=0)
    assert list(out.x_adv) == list(out.robust)
    for label, x_adv in out.x_adv.items():
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= eps + 1e-6
        if name in WHOLE_BATCH:  # submitted as the batch they came in, they reproduce the reported answers
            with torch.no_grad():
                answer = dent(x_adv).argmax(1)
            assert torch.equal(answer, out.pred[label]), label
            assert not (out.robust[label] & (answer != y)).any()  # a point reported robust is answered right
    worst = out.worst_case_inputs()
    broken_somewhere = ~torch.stack(list(out.robust.values())).all(0)
    first_label = list(out.x_adv)[0]
    for i in range(len(x)):  # each point's input realizes its worst case: from a label that broke it, if any
        sources = [label for label in out.x_adv if torch.equal(out.x_adv[label][i], worst[i])]
        assert sources and (not broken_somewhere[i] or any(not out.robust[label][i] for label in sources))
    assert broken_somewhere.any() and first_label


def test_python_api(defended):
    from dent.attacks.adaptive import adaptive_attack

    dent, x, y = defended
    out = adaptive_attack(dent, x, y, "through_adaptation", eps=32 / 255, n_iter=2, n_target_classes=1,
                          attacks=["apgd-dlr"], horizon=1)
    assert list(out.robust) == ["apgd-dlr"] and out.notes["gradient"]["differentiated_steps"] == 1
    out = adaptive_attack(dent, x, y, "transfer", eps=32 / 255, n_iter=2, version="custom", attacks=("apgd-ce",))
    assert list(out.robust) == ["static:ensemble"]


def test_adaptive_attacks_on_a_non_dent_model_are_clear_errors():
    from dent.errors import InvalidInputError

    net = tiny_net()
    data = fake_data(4, model=net)
    with pytest.raises(InvalidInputError, match="Dent"):
        ATTACKS.get("through_adaptation")(net, data.images, data.labels, point(name="through_adaptation"),
                                           device="cpu", seed=0)


def test_config_keys_and_unit_keys():
    c = EvaluateConfig.load(None, ["attack.name", "mixed", "attack.adaptive.mixed", "[1, 0.1]",
                           "attack.adaptive.horizon", "3", "attack.adaptive.attacks", "apgd-dlr"])
    p = c.attack.points()[0]
    # A point's key covers only the keys its attack reads (horizon is through_adaptation's).
    assert p.adaptive.mixed == [1, 0.1] and p.adaptive.horizon is None and p.adaptive.attacks == ["apgd-dlr"]
    assert "mix 1 adv,10%" in p.label
    # Unset, the section is absent: other attacks' configs, run hashes and unit keys did not change.
    assert "adaptive" not in EvaluateConfig.load(None, []).to_dict()["attack"]
    assert "adaptive" not in EvaluateConfig.load(None, []).attack.points()[0].to_dict()
    for bad, message in [(["attack.adaptive.attacks", "[fab]"], "unknown APGD variant"),
                         (["attack.adaptive.mixed", "[1.5]"], "mixed"),
                         (["attack.adaptive.sources", "[dent]"], "sources"),
                         (["attack.name", "pgd", "attack.attacks", "[apgd-ce]"], "AutoAttack attacks")]:
        with pytest.raises(ConfigError, match=message):
            EvaluateConfig.load(None, bad)
    t = EvaluateConfig.load(None, ["attack.name", "transfer", "attack.version", "custom", "attack.attacks", "[apgd-ce]"])
    assert t.attack.points()[0].attacks == ("apgd-ce",)
    assert AdaptiveSection(sources=["static", "shortened"]).source_list("transfer")[1].value == "shortened"


def test_static_source_fast_path_is_opt_in_and_keyed(defended):
    from dent.attacks.adaptive import StaticModel

    dent, x, y = defended
    base = ["attack.name", "transfer", "attack.version", "custom", "attack.attacks", "[apgd-ce]"]
    plain = EvaluateConfig.load(None, base).attack.points()[0]
    fast = EvaluateConfig.load(None, [*base, "attack.adaptive.static_autocast", "bfloat16"]).attack.points()[0]
    assert "static_autocast" not in plain.to_dict()["adaptive"] and fast.adaptive.static_autocast == "bfloat16"
    assert fast.to_dict() != plain.to_dict()  # a result key: other gradients, other adversarial inputs
    out = ATTACKS.get("transfer")(dent, x, y, fast, device="cpu", seed=0)
    assert out.notes["sources"]["static"] == {"source": "static", "autocast": "bfloat16"}
    static, mixed = StaticModel(dent.model)(x), StaticModel(dent.model, torch.bfloat16)(x)
    assert mixed.dtype == torch.float32 and 0 < (mixed - static).abs().max() < 0.1


@pytest.mark.parametrize("input_mode", ["batch", "sample"])
def test_blur_sources_are_the_static_model_behind_dents_blur_at_its_initial_or_adapted_width(input_mode):
    from dent.attacks.adaptive import _source
    from dent.attacks.adaptive_config import Source
    from dent.defenses.blur import gaussian_blur

    net = tiny_net()
    x = fake_data(6, model=net).images
    dent = Dent(net, DentConfig(steps=3, lr=0.05, input=input_mode, sigma_init=0.8, sigma_lr=0.5))
    adaptive = AdaptiveSection()
    initial, info = _source(dent, Source.BLUR, adaptive, lambda m: m, x)
    assert info == {"source": "blur", "sigma": 0.8}
    with torch.no_grad():
        assert torch.allclose(initial(x), net(gaussian_blur(x, torch.tensor([0.8]), 15)))
    adapted, info = _source(dent, Source.ADAPTED_BLUR, adaptive, lambda m: m, x)
    with torch.no_grad():
        dent(x)
    width = dent.adapted_sigma().median()
    assert abs(info["sigma"] - 0.8) > 1e-3 and info["sigma"] == pytest.approx(float(width), abs=1e-6)
    with torch.no_grad():
        assert torch.allclose(adapted(x), net(gaussian_blur(x, width.reshape(1), 15)))
    # differentiable w.r.t. the input (it is a transfer surrogate)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adapted(xr).sum(), xr)
    assert grad.abs().sum() > 0


def test_blur_sources_of_a_defense_without_a_blur_are_the_static_model(defended):
    dent, x, y = defended
    p = point(name="transfer", threats=["Linf:32/255"], n_iter=[2], version="custom", attacks=["apgd-ce"],
              adaptive={"sources": ["static", "blur", "adapted_blur"]})
    out = ATTACKS.get("transfer")(dent, x, y, p, device="cpu", seed=0)
    assert list(out.robust) == ["static:ensemble", "blur:ensemble", "adapted_blur:ensemble"]
    assert out.notes["sources"]["blur"]["source"] == "static" and "no input blur" in out.notes["sources"]["blur"]["why"]
    assert torch.equal(out.robust["static:ensemble"], out.robust["blur:ensemble"])
    assert "from static+blur+adapted_blur" in p.label


@pytest.mark.parametrize("name, extra", [
    ("autoattack", {"version": "custom", "attacks": ["apgd-ce"], "threats": ["Linf:32/255"]}),
    ("pgd", {"threats": ["Linf:32/255"]}),
    ("declared_apgd", {"threats": ["Linf:32/255"]}),
    ("cw_l2", {"threats": ["L2:0.5"], "cw": {"search_steps": 1}}),
])
def test_the_other_runners_return_their_adversarial_inputs_in_the_ball_too(defended, name, extra):
    dent, x, y = defended
    p = point(name=name, n_iter=[2], n_restarts=1, **extra)
    out = ATTACKS.get(name)(dent, x, y, p, device="cpu", seed=0)
    assert list(out.x_adv) == list(out.robust)
    for x_adv in out.x_adv.values():
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
        distance = (x_adv - x).flatten(1).norm(dim=1).max() if name == "cw_l2" else (x_adv - x).abs().max()
        assert distance <= p.eps + 1e-5
