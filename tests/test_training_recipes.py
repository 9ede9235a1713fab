"""Recipes: each lowers its loss in one short epoch; TRADES matches its formula; DYNAT trains on the guide's argmax."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dent.training.adversaries import pgd_examples
from dent.training.recipes import RECIPES, StepContext, alp_loss, trades_loss
from dent.training.trainer import Trainer, carve_holdout
from training_support import build_tiny, builder_for, one_thread, synthetic_split, tiny_config, tiny_net  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_RECIPES = ["nominal", "pgd", "fgsm_rs", "trades", "alp", "temperature", "distillation", "gradient_penalty", "dynat",
               "pixelcnn"]
#: Recipes that fit a detector around a trained model instead (tests/test_detection_training.py)
DETECTOR_RECIPES = ["kde_detector", "subnetwork_detector"]
#: Recipes that need more than a config (distillation: a trained teacher; tests/test_training_regularizers.py)
SELF_CONTAINED = [r for r in ALL_RECIPES if r != "distillation"]
NOT_ADVERSARIAL = ("nominal", "temperature", "gradient_penalty", "pixelcnn")


def recipe_loss(trainer: Trainer, model, extras, images, labels, seed: int = 123) -> float:
    """The recipe's loss on fixed data, on copies (train-mode BatchNorm would update the originals)."""
    model = copy.deepcopy(model).train()
    extras = {k: copy.deepcopy(m).train() for k, m in extras.items()}
    ctx = StepContext(model, trainer.tcfg, torch.Generator().manual_seed(seed), extras, trainer.frozen)
    with torch.no_grad():  # the attacks enable gradients for themselves
        return trainer.recipe.loss(ctx, images, labels).loss.item()


def test_all_recipes_registered():
    assert RECIPES.names() == ALL_RECIPES + DETECTOR_RECIPES
    assert [name for name, recipe in RECIPES.items() if recipe.detector] == DETECTOR_RECIPES


@pytest.mark.parametrize(
    "recipe,norm", [(r, n) for r in SELF_CONTAINED for n in ("Linf", "L2") if not (r in NOT_ADVERSARIAL and n == "L2")]
)
def test_one_short_epoch_lowers_the_training_loss(recipe, norm, tmp_path):
    eps = "8/255" if norm == "Linf" else "0.5"
    density = ["train.optimizer", "adam", "train.lr", "0.01"] if recipe == "pixelcnn" else []  # as its config
    cfg = tiny_config(recipe, "train.attack.norm", norm, "train.attack.eps", eps, *density)
    data = carve_holdout(synthetic_split(240), cfg.train)  # 200 training images, 10 steps of 20
    trainer = Trainer(cfg, data, run_dir=tmp_path / "run", build=builder_for(recipe), console=False)
    trainer.setup()
    before = recipe_loss(trainer, trainer.model, trainer.extras, data.train.images, data.train.labels)
    result = trainer.run()
    after = recipe_loss(trainer, result.model, result.extras, data.train.images, data.train.labels)
    assert result.status == "finished" and len(result.history) == 1
    assert after < before, f"{recipe}/{norm}: loss {before:.4f} -> {after:.4f}"
    assert math.isfinite(result.history[0]["train_loss"])


def test_trades_loss_matches_hand_computed_formula():
    # sample 1: clean logits (0, 0) -> p = (1/2, 1/2), y = 0: CE = ln 2; adversarial (ln 3, 0) -> q = (3/4, 1/4):
    #           KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # sample 2: clean (ln 4, 0) -> p = (4/5, 1/5), y = 1: CE = ln 5; adversarial = clean: KL = 0
    clean = torch.tensor([[0.0, 0.0], [math.log(4), 0.0]])
    adv = torch.tensor([[math.log(3), 0.0], [math.log(4), 0.0]])
    y = torch.tensor([0, 1])
    expected = (math.log(2) + math.log(5)) / 2 + 6.0 * (0.5 * math.log(4 / 3) + 0.0) / 2
    assert trades_loss(clean, adv, y, beta=6.0).item() == pytest.approx(expected, rel=1e-6)
    assert trades_loss(clean, adv, y, beta=0.0).item() == pytest.approx(math.log(10) / 2, rel=1e-6)


def test_trades_gradient_flows_through_both_branches():
    clean = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    trades_loss(clean, adv, torch.tensor([2]), beta=6.0).backward()
    assert clean.grad.abs().sum() > 0 and adv.grad.abs().sum() > 0


def test_alp_loss_formula():
    clean = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    expected = 0.5 * F.cross_entropy(clean, y) + 0.5 * F.cross_entropy(adv, y) + 0.5 * ((1 + 1 + 0 + 4) / 4)
    assert alp_loss(clean, adv, y, clean_weight=0.5, weight=0.5).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("inner", [False, True])
def test_dynat_targets_are_the_guide_argmax(inner):
    cfg = tiny_config("dynat", "train.dynat.inner", str(inner).lower(), "train.dynat.balance", "0.7")
    torch.manual_seed(0)
    model, guide = tiny_net(), tiny_net()
    data = synthetic_split(30)
    x, y = data.images, data.labels
    model_copy, guide_copy = copy.deepcopy(model), copy.deepcopy(guide)
    ctx = StepContext(model, cfg.train, torch.Generator().manual_seed(5), {"guide": guide})
    out = RECIPES.get("dynat").loss(ctx, x, y)

    guide_logits = guide_copy(x)  # train mode, as in the recipe
    labels = guide_logits.argmax(dim=1)
    assert torch.equal(out.targets, labels)
    assert not torch.equal(labels, y)  # an untrained guide disagrees with the ground truth: the test means something
    a = cfg.train.attack
    x_adv = pgd_examples(model_copy, x, labels if inner else y, norm=a.norm, eps=a.eps, step=a.step_size,
                         steps=a.steps, generator=torch.Generator().manual_seed(5), bn_mode=a.bn_mode)
    expected = F.cross_entropy(model_copy(x_adv), labels) + 0.7 * F.cross_entropy(guide_logits, y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in guide.parameters())  # the guide is trained on clean data
