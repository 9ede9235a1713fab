"""Defensive distillation, gradient penalties and AWP: each recipe's defining property, and bad options."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dent.errors import ConfigError
from dent.training.awp import frozen_bn_statistics, perturbed, perturbed_parameters, weight_perturbation
from dent.training.recipes import distillation_loss, input_gradient_penalty, jacobian_penalty
from dent.training.trainer import ResumeError, Trainer, carve_holdout
from test_training_recipes import ALL_RECIPES, DETECTOR_RECIPES
from training_support import build_tiny, one_thread, synthetic_split, tiny_config, tiny_net  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def make(cfg, tmp_path, name="run", n=120):
    data = carve_holdout(synthetic_split(n), cfg.train)
    return Trainer(cfg, data, run_dir=tmp_path / name, build=build_tiny, console=False)


# -- defensive distillation --------------------------------------------------------------------------


def test_the_distillation_loss_uses_the_temperature():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[4.0, 1.0, 0.0]])
    for t in (1.0, 5.0, 50.0):
        soft = torch.softmax(teacher / t, dim=1)
        expected = -(soft * torch.log_softmax(student / t, dim=1)).sum().item()
        assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, 1.0) != pytest.approx(distillation_loss(student, teacher, 20.0).item())
    # at high T the soft labels are almost uniform: the loss tends to log(3)
    assert distillation_loss(student, teacher, 1e4).item() == pytest.approx(math.log(3), rel=1e-3)


def test_a_teacher_trained_at_temperature_teaches_a_student_whose_softmax_saturates_at_t_1(tmp_path):
    # the loss's gradient is 1/T of the usual one: a larger learning rate, 400 images, 3 epochs (~5 s)
    at_t = ["train.distillation.temperature", "10", "train.epochs", "3", "train.lr", "1.0"]
    teacher_run = make(tiny_config("temperature", *at_t), tmp_path, "teacher", n=400).run()
    student_cfg = tiny_config("distillation", *at_t, "train.distillation.teacher", str(teacher_run.run_dir))
    result = make(student_cfg, tmp_path, "student", n=400).run()
    assert result.status == "finished" and result.history[-1]["teacher_acc"] > 0.2  # chance: 0.1
    x = synthetic_split(40, seed=1).images
    with torch.no_grad():
        logits = result.model.eval()(x)
    # trained at T = 10 and deployed at T = 1, the logits are scaled up: the top softmax probability saturates
    assert torch.softmax(logits, dim=1).max(dim=1).values.median() > 0.99
    # the teacher's digest is in the history and guards resume
    ckpt = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert set(ckpt["frozen"]) == {"teacher"} and len(ckpt["frozen"]["teacher"]["digest"]) == 32


def test_resuming_a_student_with_another_teacher_is_refused(tmp_path):
    teachers = [make(tiny_config("temperature", "seed", str(s)), tmp_path, f"teacher{s}").run() for s in (0, 1)]
    args = ["train.epochs", "2", "train.distillation.teacher"]
    make(tiny_config("distillation", *args, str(teachers[0].run_dir)), tmp_path, "student").run(until_epoch=1)
    other = make(tiny_config("distillation", *args, str(teachers[1].run_dir)), tmp_path, "student")
    with pytest.raises(ResumeError, match="teacher"):
        other.run(resume=True)


@pytest.mark.parametrize("teacher,message", [
    ("no-such-model", "neither a dent train run directory"),
    ("{empty}", "holds no checkpoint.pt"),
])
def test_a_missing_teacher_is_named(teacher, message, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config("distillation", "train.distillation.teacher", teacher.format(empty=tmp_path / "empty"))
    with pytest.raises(ConfigError, match=message):
        make(cfg, tmp_path).setup()


def test_an_unfinished_teacher_is_refused(tmp_path):
    run = make(tiny_config("temperature", "train.epochs", "2"), tmp_path, "teacher").run(until_epoch=1)
    cfg = tiny_config("distillation", "train.distillation.teacher", str(run.run_dir))
    with pytest.raises(ConfigError, match="stopped at epoch 1 of 2"):
        make(cfg, tmp_path).setup()


# -- gradient penalties ------------------------------------------------------------------------------


def linear_problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 3).double()
    x = torch.rand(5, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 1])
    return model, x, y


def test_the_input_gradient_penalty_is_the_squared_norm_of_the_cross_entropy_gradient():
    model, x, y = linear_problem()
    p = torch.softmax(model(x), dim=1).detach()
    per_point = (p - F.one_hot(y, 3)) @ model.weight.detach()  # d CE_i / d x_i for a linear model
    expected = per_point.pow(2).sum(dim=1).mean()
    assert input_gradient_penalty(model(x), x, y).item() == pytest.approx(expected.item(), rel=1e-10)


def test_the_jacobian_penalty_estimates_the_frobenius_norm_without_bias():
    model, x, _ = linear_problem()
    g = torch.Generator().manual_seed(0)
    estimate = jacobian_penalty(model(x), x, projections=100, generator=g).item()
    # the Jacobian of a linear model is its weight at every input; 100 projections x 5 images: within 5 %
    assert estimate == pytest.approx(model.weight.pow(2).sum().item(), rel=0.05)


@pytest.mark.parametrize("penalty", ["input_gradient", "jacobian"])
def test_the_penalties_pass_a_gradient_check(penalty):
    """Their gradient with respect to the weights (double backpropagation) matches finite differences."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x0 = torch.rand(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    params = list(net.parameters())

    def value(*weights):
        x = x0.clone().requires_grad_(True)
        logits = torch.func.functional_call(net, {n: w for (n, _), w in zip(net.named_parameters(), weights)}, (x,))
        if penalty == "input_gradient":
            return input_gradient_penalty(logits, x, y)
        return jacobian_penalty(logits, x, projections=2, generator=torch.Generator().manual_seed(1))

    assert torch.autograd.gradcheck(value, tuple(p.detach().requires_grad_(True) for p in params))


@pytest.mark.parametrize("kind", ["input_gradient", "jacobian"])
def test_the_gradient_penalty_recipe_lowers_the_penalty_it_weighs(kind, tmp_path):
    def penalty_after(weight: str) -> float:
        cfg = tiny_config("gradient_penalty", "train.gradient_penalty.weight", weight, "train.epochs", "2",
                          "train.gradient_penalty.kind", kind)
        return make(cfg, tmp_path, f"w{weight}").run().history[-1]["penalty"]

    assert penalty_after("10") < penalty_after("0.001")


# -- AWP ---------------------------------------------------------------------------------------------


def test_awp_perturbs_each_weight_within_its_radius_and_restores_it():
    torch.manual_seed(0)
    model = tiny_net().eval()  # (train-mode BatchNorm would change its statistics on every call)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    before = copy.deepcopy(model.state_dict())
    v = weight_perturbation(model, F.cross_entropy(model(x), y), gamma=0.01)
    assert {id(p) for p, _ in v} == {id(p) for p in perturbed_parameters(model)}  # convolutions and linear weights
    assert all(p.dim() > 1 for p, _ in v)
    loss_before = F.cross_entropy(model(x), y).item()
    with perturbed(v):
        for param, offset in v:
            assert offset.norm().item() == pytest.approx(0.01 * (param.detach() - offset).norm().item(), rel=1e-5)
        loss_inside = F.cross_entropy(model(x), y).item()
    assert loss_inside > loss_before  # an ascent step
    for key, value in model.state_dict().items():
        assert torch.allclose(value, before[key], atol=1e-7), key


def test_awp_restores_the_weights_when_the_block_fails():
    model = tiny_net().eval()
    before = copy.deepcopy(model.state_dict())
    v = weight_perturbation(model, model(torch.rand(4, 3, 16, 16)).sum(), gamma=0.5)
    with pytest.raises(RuntimeError), perturbed(v):
        raise RuntimeError("boom")
    assert all(torch.allclose(model.state_dict()[k], before[k], atol=1e-6) for k in before)


def test_the_second_awp_pass_leaves_batchnorm_statistics_alone():
    model = tiny_net().train()
    before = copy.deepcopy(model.state_dict())
    with frozen_bn_statistics(model):
        model(torch.rand(4, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("recipe", ["pgd", "trades", "dynat"])
def test_awp_trains_the_adversarial_recipes_and_changes_their_update(recipe, tmp_path):
    args = ["train.attack.steps", "2"]
    plain = make(tiny_config(recipe, *args), tmp_path, "plain").run()
    awp = make(tiny_config(recipe, *args, "train.awp.gamma", "0.01"), tmp_path, "awp").run()
    assert awp.status == "finished" and math.isfinite(awp.history[0]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), awp.model.state_dict().values()))
    warm = make(tiny_config(recipe, *args, "train.awp.gamma", "0.01", "train.awp.warmup", "1"), tmp_path, "warm").run()
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), warm.model.state_dict().values()))


# -- bad options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["train.recipe", "nominal", "train.awp.gamma", "0.01"], "train.awp applies to the recipes pgd, trades, dynat"),
    (["train.recipe", "pgd", "train.distillation.temperature", "5"], "train.distillation applies to the recipes"),
    (["train.recipe", "pgd", "train.trades.beta", "1"], "train.trades applies to the recipe trades"),
    (["train.recipe", "temperature", "train.distillation.temperature", "0"], "greater than 0"),
    (["train.recipe", "temperature", "train.distillation.temperature", "-1"], "greater than 0"),
    (["train.recipe", "distillation"], "needs train.distillation.teacher"),
    (["train.recipe", "gradient_penalty", "train.gradient_penalty.kind", "hessian"], "input_gradient"),
    (["train.recipe", "pgd", "train.awp.gamma", "2"], "less than or equal to 1"),
])
def test_bad_recipe_options_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("nominal", *args)


def test_a_recipe_option_that_does_not_apply_exits_2_on_the_command_line(tmp_path, capsys):
    from dent.cli.main import main

    code = main(["train", "train.recipe", "nominal", "train.awp.gamma", "0.01", "output.root", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.awp applies to the recipes pgd, trades, dynat" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "cfgs" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_training_config_loads(path):
    from dent.training.config import TrainConfig

    cfg = TrainConfig.load(path, [])
    assert cfg.train.recipe in ALL_RECIPES + DETECTOR_RECIPES
