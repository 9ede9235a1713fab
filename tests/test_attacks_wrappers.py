"""Generic BPDA and EOT driven by declared traits: a zero-gradient transform stops plain APGD, not BPDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent.attacks.apgd_batch import apgd_batch
from dent.attacks.wrappers import BPDA, EOT, PlainGradient, attack_view
from dent.defenses.protocol import Preprocessed
from dent.defenses.transforms import BitDepth, RandomResizePad
from dent.errors import InvalidInputError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.report import load_summary
from dent.evaluation.runner import evaluate
from dent.evaluation.security import sanity_checks

from eval_support import NoisyDefense, fake_data, tiny_net

EPS = 8 / 255


class Linear2(nn.Module):
    """Two classes, logits (s, -s) with s = w . (x - 0.5)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        s = ((x - 0.5).flatten(1) * self.w).sum(dim=1)
        return torch.stack([s, -s], dim=1)


def toy_problem():
    """Images at margin 4/255 * ||w||_1 from the boundary: broken by the worst case at eps 8/255 (which
    moves s by 8/255 * ||w||_1), never by APGD's random start (std about eps * ||w||_2 / sqrt(3))."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 2, (3 * 8 * 8,), generator=g).float() * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    sign = 1 - 2 * y.float()  # class 0: s > 0
    x = 0.5 + (4 / 255) * sign[:, None] * w[None]
    return Linear2(w), x.view(4, 3, 8, 8), y


def test_plain_apgd_is_stopped_by_a_zero_gradient_transform_and_bpda_is_not():
    model, x, y = toy_problem()
    defense = Preprocessed(BitDepth(8), model)
    with torch.no_grad():
        assert torch.equal(defense(x).argmax(1), y)
    plain = apgd_batch(defense, x, y, attack="apgd-ce", eps=EPS, n_iter=10)
    assert plain.robust.all()  # the gradient through rounding is zero: APGD cannot move
    view = attack_view(defense)
    assert isinstance(view, BPDA)
    broken = apgd_batch(view, x, y, attack="apgd-ce", eps=EPS, n_iter=10)
    assert not broken.robust.any()
    with torch.no_grad():  # the adversarial inputs break the defense itself, within the ball
        assert (defense(broken.x_adv).argmax(1) != y).all()
    assert (broken.x_adv - x).abs().max() <= EPS + 1e-6


class NoisyGradient(nn.Module):
    """A randomized toy defense: it answers the model's logits exactly, but each call's input gradient carries a
    fresh random term (std ``noise`` per pixel, 5x the model's own): single-draw gradients point nowhere."""

    randomized = True

    def __init__(self, model: nn.Module, noise: float):
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, x):
        drift = (self.noise * torch.randn_like(x) * x).flatten(1).sum(dim=1)
        drift = drift - drift.detach()  # no effect on the answer, only on the gradient
        return self.model(x) + torch.stack([drift, -drift], dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_eot_raises_attack_success_over_single_draw_gradients_on_a_randomized_defense(seed):
    model, x, y = toy_problem()
    defense = NoisyGradient(model, noise=5.0)
    with torch.no_grad():
        assert torch.equal(defense(x).argmax(1), y)
    single = apgd_batch(defense, x, y, attack="apgd-ce", eps=EPS, n_iter=10, eot_iter=1, seed=seed)
    averaged = apgd_batch(defense, x, y, attack="apgd-ce", eps=EPS, n_iter=10, eot_iter=32, seed=seed)
    assert int(single.robust.sum()) >= 3 and not averaged.robust.any()


def test_bpda_answers_are_the_defense_s_and_its_gradient_the_surrogate_s():
    model, x, _ = toy_problem()
    defense = Preprocessed(BitDepth(2), model)
    view = BPDA(defense)
    xg = x.clone().requires_grad_(True)
    out = view(xg)
    assert torch.equal(out.detach(), defense(x))
    out[:, 0].sum().backward()
    assert torch.allclose(xg.grad.flatten(1), model.w.expand(4, -1))


def test_attack_view_follows_the_declarations_only():
    net = tiny_net()
    view = attack_view(net)  # differentiable, deterministic: the defense itself, with an exact zero gradient path
    assert isinstance(view, PlainGradient) and view.defense is net
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    (g_view,) = torch.autograd.grad(view(x).sum(), x)
    (g_net,) = torch.autograd.grad(net(x).sum(), x)
    assert torch.equal(view(x), net(x)) and torch.equal(g_view, g_net)
    noisy = NoisyDefense(net)
    view = attack_view(noisy, 5)
    assert isinstance(view, EOT) and view.model.defense is noisy and view.samples == 5
    both = Preprocessed(BitDepth(4), Preprocessed(RandomResizePad(), net))
    view = attack_view(both)
    assert isinstance(view, EOT) and isinstance(view.model, BPDA)


def test_eot_averages_the_draws():
    class Counter(nn.Module):
        randomized = True

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    counter = Counter()
    out = EOT(counter, 4)(torch.ones(1, 2))
    assert counter.calls == 4 and torch.allclose(out, torch.full((1, 2), 2.5))


def test_evaluate_a_jpeg_then_dent_pipeline_end_to_end(tmp_path):
    """The harness plans, runs and reports a composed defense under the declared-traits attack."""
    net = tiny_net()
    data = fake_data(8, model=net)
    cfg = EvaluateConfig.model_validate({
        "device": "cpu", "data": {"n_images": 8, "batch_size": 8}, "evaluation": {"progress": False},
        "defenses": {"jpeg_dent": {"kind": "pipeline", "stages": [{"kind": "jpeg", "quality": 60},
                                                                   {"steps": 1, "lr": 0.01}]}},
        "attack": {"name": "declared_apgd", "threats": ["Linf:8/255"], "n_iter": [2], "n_target_classes": 1},
    })
    run = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert run.n_run == 2  # clean and attack units
    summary = load_summary([run.run_dir])
    (row,) = summary.rows
    assert row.defense == "jpeg_dent" and row.natural.n == 8 and row.steps == 1  # the dent stage's steps
    assert set(row.attacks) and all(pr.worst.n == 8 for pr in row.attacks.values())
    # JPEG runs outside autograd: the plain gradient is missing at every point, and the report says so.
    assert row.plain_gradient == {"n": 8, "zero": 8, "nonfinite": 0}
    assert any(c.kind == "gradient" and not c.ok for c in sanity_checks(summary))
    again = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert again.n_skipped == 2 and again.n_run == 0  # resumable by unit key


def test_mixed_batches_attack_a_non_differentiable_defense_through_bpda():
    """The mixed-batch attack reads the declarations too: with a rounding transform before the model it
    still breaks the toy points (plain gradients would be zero)."""
    from dent.attacks.adaptive import MixedBatch, adaptive_attack

    model, x, y = toy_problem()
    defense = Preprocessed(BitDepth(8), model)
    mixed = MixedBatch(defense, x, [0, 1])
    assert mixed.differentiable is False and isinstance(attack_view(mixed), BPDA)
    outcome = adaptive_attack(defense, x, y, "mixed", eps=EPS, n_iter=10, attacks=("apgd-ce",), mixed=[2])
    assert not outcome.robust["mixed 2 adv"].any()


@pytest.mark.parametrize("attack, warned", [
    ({"name": "autoattack", "version": "custom", "attacks": ["apgd-ce"]}, True),
    ({"name": "autoattack", "version": "custom", "attacks": ["apgd-ce"], "eot_iter": 2}, False),
    ({"name": "declared_apgd"}, False),
])
def test_autoattack_without_eot_on_a_randomized_defense_is_named(tmp_path, capsys, attack, warned):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    data = fake_data(8, model=net)
    cfg = {"device": "cpu", "data": {"n_images": 8, "batch_size": 8},
           "evaluation": {"progress": False, "report": False, "clean": False},
           "defenses": {"noisy": {"kind": "eval_support:NoisyDefense", "params": {"std": 0.1}}},
           "attack": {"threats": ["Linf:1/255"], "n_iter": [1], "n_target_classes": 1, "n_restarts": 1, **attack}}
    evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert ("takes single-draw gradients" in capsys.readouterr().out) is warned


def test_a_randomized_defense_clean_accuracy_is_drawn_several_times(tmp_path):
    """A randomized defense's clean unit records evaluation.clean_draws predictions (the first is its
    clean_pred); a deterministic one (bit depth) records none. The security table adds their mean and spread."""
    from dent.evaluation.rundir import find_store
    from dent.evaluation.security import security_tables
    from dent.evaluation.store import ResultStore
    from dent.evaluation.summary import format_cell

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    data = fake_data(16, model=net)
    cfg = {"device": "cpu", "data": {"n_images": 16, "batch_size": 8},
           "evaluation": {"progress": False, "report": False, "clean_draws": 5},
           "defenses": {"squeeze": {"kind": "bit_depth"}, "noisy": {"kind": "eval_support:NoisyDefense", "params": {"std": 0.3}}},
           "attack": {"name": "declared_apgd", "threats": ["Linf:1/255"], "n_iter": [1], "n_target_classes": 1,
                      "eot_iter": 1}}
    run = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    with ResultStore(find_store(run.run_dir), create=False) as store:
        clean = {(r.defense, r.batch_index): r.result for r in store.records() if r.kind == "clean"}
    for (defense, _), result in clean.items():
        draws = result["notes"].get("clean_draws")
        if defense == "squeeze":
            assert draws is None
        else:
            assert len(draws) == 5 and draws[0] == result["clean_pred"]
    assert len({tuple(p) for b in (0, 1) for p in clean[("noisy", b)]["notes"]["clean_draws"]}) > 2
    summary = load_summary([run.run_dir])
    (table,) = security_tables(summary)
    measure, cells = table.lines[1]
    assert measure.startswith("clean, mean (min-max) over draws") and cells[0] is None
    draws = cells[1]
    accuracies = [c / n for c, n in draws.by_repeat.values()]
    assert len(accuracies) == 5 and all(n == 16 for _, n in draws.by_repeat.values())
    low, high = min(accuracies), max(accuracies)
    assert format_cell(draws) == f"{100 * sum(accuracies) / 5:.1f} ({100 * low:.1f}-{100 * high:.1f})"
    assert table.lines[0][1][1].n == 16  # the clean line stays the first draw, with its interval




def test_a_randomized_defense_is_measured_over_draws_by_repeats(tmp_path, capsys):
    """One repeat warns that it is one draw; repeats draw again (repeat r seeds with seed + r)."""
    from dent.evaluation.store import ResultStore
    from dent.evaluation.rundir import find_store

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()  # answers vary with the input
    data = fake_data(16, model=net)
    cfg = {"device": "cpu", "data": {"n_images": 16, "batch_size": 16},
           "evaluation": {"progress": False, "report": False, "repeats": 1},
           "defenses": {"noisy": {"kind": "eval_support:NoisyDefense", "params": {"std": 0.2}}},
           "attack": {"name": "declared_apgd", "threats": ["Linf:1/255"], "n_iter": [1], "n_target_classes": 1,
                      "eot_iter": 1}}
    evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert "defense 'noisy' is randomized" in capsys.readouterr().out
    cfg["evaluation"]["repeats"] = 3
    evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    assert "is randomized" not in capsys.readouterr().out
    with ResultStore(find_store(tmp_path / "run"), create=False) as store:
        clean = [r.result["clean_pred"] for r in store.records() if r.kind == "clean"]
    assert len(clean) == 3 and len({tuple(c) for c in clean}) > 1  # different draws per repeat


def bit_depth_dent():
    from dent.defenses import Dent

    return Preprocessed(BitDepth(5), Dent(tiny_net(), {"steps": 2, "lr": 0.01}))


def test_dent_variants_behind_a_non_differentiable_transform_get_its_straight_through_gradient():
    from dent.attacks.adaptive import _dent_of
    from dent.defenses.differentiable import DifferentiableDent

    pipeline = bit_depth_dent()
    dent, rewrap = _dent_of(pipeline, "through_adaptation")
    assert dent is pipeline.model
    attacked = rewrap(DifferentiableDent(dent))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = attacked(x)
    with torch.no_grad():
        assert torch.allclose(out, pipeline(x), atol=1e-5)  # the defense's answers
    out.sum().backward()
    assert x.grad.abs().sum() > 0  # through the rounding (straight-through) and the adaptation
    xp = x.detach().clone().requires_grad_(True)
    pipeline(xp).sum().backward()
    assert xp.grad.abs().sum() == 0  # the pipeline's own gradient is zero


@pytest.mark.parametrize("name", ["transfer", "through_adaptation", "bpda_eot", "surrogate_transfer", "mixed",
                                  "batch_mates"])
def test_every_adaptive_attack_runs_on_transforms_before_dent(name):
    from dent.attacks.adaptive import adaptive_attack

    net = tiny_net()
    data = fake_data(8, model=net)
    extra = {"version": "custom", "attacks": ("apgd-ce",)} if name == "transfer" else {"attacks": ("apgd-ce",)}
    if name == "mixed":
        extra["mixed"] = [0.5]
    if name == "batch_mates":
        extra = {"batch_mates": [1]}
    outcome = adaptive_attack(bit_depth_dent(), data.images, data.labels, name, eps=8 / 255, n_iter=2, n_restarts=1,
                              **extra)
    assert outcome.robust and all(flags.shape == (8,) for flags in outcome.robust.values())


@pytest.mark.parametrize("name", ["through_adaptation", "surrogate_transfer", "mixed"])
def test_adaptive_attacks_average_over_the_draws_of_a_random_transform_before_dent(name):
    from dent.attacks.adaptive import adaptive_attack
    from dent.attacks.wrappers import DEFAULT_EOT_SAMPLES
    from dent.defenses import Dent

    net = tiny_net()
    data = fake_data(4, model=net)
    extra = {"attacks": ("apgd-ce",), "mixed": [0.5]} if name == "mixed" else {"attacks": ("apgd-ce",)}
    random_first = Preprocessed(RandomResizePad(0.8), Dent(net, {"steps": 1, "lr": 0.01}))
    draws = {}
    for label, defense in [("random", random_first), ("deterministic", bit_depth_dent())]:
        outcome = adaptive_attack(defense, data.images, data.labels, name, eps=EPS, n_iter=1, n_restarts=1, **extra)
        draws[label] = outcome.notes["budget"]["eot_iter"]
    assert draws == {"random": DEFAULT_EOT_SAMPLES, "deterministic": 1}
    outcome = adaptive_attack(random_first, data.images, data.labels, name, eps=EPS, n_iter=1, n_restarts=1,
                              eot_iter=3, **extra)
    assert outcome.notes["budget"]["eot_iter"] == 3  # attack.eot_iter overrides the declaration


def test_dent_attacks_refuse_a_defense_without_dent_and_point_to_declared_apgd():
    from dent.attacks.adaptive import adaptive_attack

    with pytest.raises(InvalidInputError, match="declared_apgd"):
        adaptive_attack(Preprocessed(BitDepth(4), tiny_net()), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]),
                        "through_adaptation", eps=8 / 255, n_iter=1)


def test_plain_attacks_on_a_defense_outside_autograd_fail_instead_of_raising():
    """AutoAttack and PGD differentiate the defense itself: a codec outside autograd is a zero gradient
    (every point stays robust, the masking check flags it), not an autograd error."""
    from dent.attacks import ATTACKS, AttackSection
    from dent.defenses.transforms import JPEG

    net = tiny_net()
    data = fake_data(6, model=net)
    jpeg = Preprocessed(JPEG(), net)
    with torch.no_grad():
        right = jpeg(data.images).argmax(1) == data.labels
    for name, extra in [("autoattack", {"version": "custom", "attacks": ["apgd-ce"]}), ("pgd", {})]:
        p = AttackSection(name=name, threats=["Linf:32/255"], n_iter=[3], **extra).points()[0]
        out = ATTACKS.get(name)(jpeg, data.images, data.labels, p, device="cpu", seed=0)
        (flags,) = out.robust.values()
        assert torch.equal(flags, right), name
