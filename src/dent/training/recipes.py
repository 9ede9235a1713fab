"""Training recipes: one loss function each, registered by name, all run by the one loop in :mod:`.trainer`.

A recipe turns a (model, batch, config) into a loss to minimize. Recipes that train more than the target
model (DYNAT's guide) declare *extra modules*: the trainer builds them, optimizes their parameters with
the target's (in their own parameter group), switches their train/eval mode with the target, and saves
and restores them in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dent.defenses.purification.pixelcnn import DENSITY_MODELS, bits_per_dim
from dent.registry import Registry
from dent.training.adversaries import fgsm_rs_examples, pgd_examples, trades_examples
from dent.training.config import RECIPE_OPTIONS, PenaltyKind, TrainSection

#: Builds a freshly initialized model from an architecture name.
ModelBuilder = Callable[[str], nn.Module]


@dataclass
class StepContext:
    """What a recipe sees at each training step."""

    model: nn.Module
    cfg: TrainSection
    generator: torch.Generator  # the only source of randomness a recipe may use (random starts)
    extras: dict[str, nn.Module] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)  # fixed modules (distillation's teacher)
    #: the step's training examples, made once per step (AWP computes the recipe's loss twice per step)
    examples: dict[str, torch.Tensor] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, computed on the first call of this step only."""
        if key not in self.examples:
            self.examples[key] = make()
        return self.examples[key]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, to minimize
    metrics: dict[str, float] = field(default_factory=dict)  # averaged over the epoch into the JSON log
    targets: Optional[torch.Tensor] = None  # the labels the main loss was computed against (DYNAT: the guide's)


LossFn = Callable[[StepContext, torch.Tensor, torch.Tensor], StepOutput]


def no_extras(cfg: TrainSection, arch: str, build: ModelBuilder) -> dict[str, nn.Module]:
    return {}


def no_frozen(cfg: TrainSection, build: ModelBuilder) -> dict[str, nn.Module]:
    return {}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    loss: Optional[LossFn]  # None: a detector recipe, fitted outside the epoch loop (``detector``)
    adversarial: bool = True
    extra_modules: Callable[[TrainSection, str, ModelBuilder], dict[str, nn.Module]] = no_extras
    #: learning rate of an extra module's parameter group; default: ``cfg.lr``
    extra_lr: Callable[[TrainSection, str], float] = lambda cfg, name: cfg.lr
    #: fixed, already trained modules the loss reads (not optimized, not saved; their digests guard resume)
    frozen_modules: Callable[[TrainSection, ModelBuilder], dict[str, nn.Module]] = no_frozen
    #: the sections of :data:`~dent.training.config.RECIPE_OPTIONS` it reads (any other one set is a config error)
    options: tuple[str, ...] = ()
    #: a detector recipe: the detector class (dent.defenses.detection.stored.DETECTOR_CLASSES) that
    #: dent.training.detectors fits around the trained model ``model.arch``, instead of training a model
    detector: Optional[str] = None
    #: a recipe that trains another kind of model than a classifier (a density model): the registry of factories
    #: ``() -> nn.Module`` that ``model.arch`` names; default: the classifier architectures (dent.models)
    models: Optional[Registry] = None
    #: the held-out measurement of such a model, ``(model, images, cfg) -> {name: value}``, in place of clean and
    #: PGD accuracy (``batch_size`` and the device are the trainer's)
    evaluate: Optional[Callable[[nn.Module, torch.Tensor, TrainSection], dict[str, float]]] = None


RECIPES: Registry[Recipe] = Registry("training recipe")


def option_readers() -> dict[str, tuple[str, ...]]:
    """Each option section -> the recipes that read it."""
    return {option: tuple(name for name, r in RECIPES.items() if option in r.options) for option in RECIPE_OPTIONS}


def recipe(name: str, description: str, **options):
    """Register ``loss(ctx, x, y) -> StepOutput`` as the recipe ``name``."""

    def register(loss: LossFn) -> LossFn:
        RECIPES.register(name, Recipe(name, description, loss, **options))
        return loss

    return register


# ---------------------------------------------------------------------------------------------------
# Adversary shortcuts bound to the config


def attack_pgd(ctx: StepContext, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    a = ctx.cfg.attack
    return ctx.once("pgd", lambda: pgd_examples(
        ctx.model, x, labels, norm=a.norm, eps=a.eps, step=a.step_size, steps=a.steps,
        random_init=a.random_start, generator=ctx.generator, bn_mode=a.bn_mode,
    ))


# ---------------------------------------------------------------------------------------------------
# Pure losses (tested on hand-made cases)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES: CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), the KL averaged over the batch.

    Gradients flow through both the clean and the adversarial logits, as in Zhang et al.'s reference code.
    """
    natural = F.cross_entropy(logits_clean, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return natural + beta * robust


def alp_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, clean_weight: float, weight: float
) -> torch.Tensor:
    """ALP: alpha CE(f(x), y) + (1 - alpha) CE(f(x_adv), y) + lambda * mean squared logit difference."""
    ce = clean_weight * F.cross_entropy(logits_clean, y) + (1 - clean_weight) * F.cross_entropy(logits_adv, y)
    return ce + weight * F.mse_loss(logits_adv, logits_clean)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Defensive distillation's student loss: cross-entropy of softmax(student / T) against the teacher's soft
    labels softmax(teacher / T), averaged over the batch (Papernot et al. 2016)."""
    soft_labels = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(soft_labels * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


def input_gradient_penalty(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ross & Doshi-Velez 2018: the squared L2 norm of each input's cross-entropy gradient, averaged over the
    batch; differentiable (double backpropagation). ``logits`` must be computed from ``x``."""
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


def jacobian_penalty(logits: torch.Tensor, x: torch.Tensor, projections: int, generator: torch.Generator) -> torch.Tensor:
    """The contractive penalty ||d logits / dx||_F^2 (Gu & Rigazio's DCN penalize it layer by layer, as an
    approximation of this end-to-end one), averaged over the batch. Estimated without bias from random unit
    projections v of the logits (Hoffman et al. 2019): ||J||_F^2 = C E_v ||v^T J||^2."""
    n_classes = logits.shape[1]
    total = logits.new_zeros(())
    for _ in range(projections):
        v = torch.randn(logits.shape, generator=generator, device="cpu").to(logits.device)
        v = v / v.norm(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad((logits * v).sum(), x, create_graph=True)
        total = total + n_classes * grad.pow(2).flatten(1).sum(dim=1).mean()
    return total / projections


def dynamic_labels(guide_logits: torch.Tensor) -> torch.Tensor:
    """DYNAT's dynamic labels: the guide's winning class on the clean input (no gradient)."""
    return guide_logits.detach().argmax(dim=1)


# ---------------------------------------------------------------------------------------------------
# Recipes


@recipe("nominal", "standard training: cross-entropy on clean (augmented) images", adversarial=False)
def nominal(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    logits = ctx.model(x)
    return StepOutput(F.cross_entropy(logits, y), {"acc": _acc(logits, y)}, y)


@recipe("pgd", "PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples", options=("awp",))
def pgd(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    logits = ctx.model(attack_pgd(ctx, x, y))
    return StepOutput(F.cross_entropy(logits, y), {"adv_acc": _acc(logits, y)}, y)


@recipe("fgsm_rs", "fast adversarial training (Wong et al. 2020): FGSM from a random start, step 1.25 eps")
def fgsm_rs(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    a = ctx.cfg.attack
    x_adv = fgsm_rs_examples(
        ctx.model, x, y, norm=a.norm, eps=a.eps, step_scale=a.fgsm_step_scale, generator=ctx.generator,
        bn_mode=a.bn_mode,
    )
    logits = ctx.model(x_adv)
    return StepOutput(F.cross_entropy(logits, y), {"adv_acc": _acc(logits, y)}, y)


@recipe("trades", "TRADES (Zhang et al. 2019): clean cross-entropy + beta KL(clean || adversarial)",
        options=("trades", "awp"))
def trades(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    a = ctx.cfg.attack
    x_adv = ctx.once("trades", lambda: trades_examples(
        ctx.model, x, norm=a.norm, eps=a.eps, step=a.step_size, steps=a.steps, generator=ctx.generator,
        bn_mode=a.bn_mode,
    ))
    logits_clean, logits_adv = ctx.model(x), ctx.model(x_adv)
    loss = trades_loss(logits_clean, logits_adv, y, ctx.cfg.trades.beta)
    return StepOutput(loss, {"acc": _acc(logits_clean, y), "adv_acc": _acc(logits_adv, y)}, y)


@recipe("alp", "adversarial logit pairing (Kannan et al. 2018) on PGD training", options=("alp",))
def alp(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    x_adv = attack_pgd(ctx, x, y)
    logits_clean, logits_adv = ctx.model(x), ctx.model(x_adv)
    loss = alp_loss(logits_clean, logits_adv, y, ctx.cfg.alp.clean_weight, ctx.cfg.alp.weight)
    pairing = F.mse_loss(logits_adv.detach(), logits_clean.detach()).item()
    return StepOutput(loss, {"acc": _acc(logits_clean, y), "adv_acc": _acc(logits_adv, y), "pairing": pairing}, y)


@recipe("temperature", "cross-entropy at softmax temperature T: the teacher of defensive distillation",
        adversarial=False, options=("distillation",))
def temperature(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    logits = ctx.model(x)
    return StepOutput(F.cross_entropy(logits / ctx.cfg.distillation.temperature, y), {"acc": _acc(logits, y)}, y)


def distillation_teacher(cfg: TrainSection, build: ModelBuilder) -> dict[str, nn.Module]:
    from dent.training.teacher import load_teacher

    return {"teacher": load_teacher(cfg.distillation.teacher, temperature=cfg.distillation.temperature, build=build)}


@recipe("distillation", "defensive distillation (Papernot et al. 2016): the teacher's soft labels at temperature T",
        adversarial=False, frozen_modules=distillation_teacher, options=("distillation",))
def distillation(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    with torch.no_grad():
        teacher_logits = ctx.frozen["teacher"](x)
    logits = ctx.model(x)
    loss = distillation_loss(logits, teacher_logits, ctx.cfg.distillation.temperature)
    return StepOutput(loss, {"acc": _acc(logits, y), "teacher_acc": _acc(teacher_logits, y)}, y)


@recipe("gradient_penalty", "cross-entropy + an input-gradient or Jacobian penalty (Ross & Doshi-Velez 2018; "
        "Gu & Rigazio 2015)", adversarial=False, options=("gradient_penalty",))
def gradient_penalty(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    g = ctx.cfg.gradient_penalty
    with torch.enable_grad():  # the penalty is a gradient, also for a caller that only evaluates the loss
        x = x.detach().requires_grad_(True)
        logits = ctx.model(x)
        if g.kind is PenaltyKind.INPUT_GRADIENT:
            penalty = input_gradient_penalty(logits, x, y)
        else:
            penalty = jacobian_penalty(logits, x, g.projections, ctx.generator)
        loss = F.cross_entropy(logits, y) + g.weight * penalty
    return StepOutput(loss, {"acc": _acc(logits, y), "penalty": penalty.item()}, y)


def dynat_extras(cfg: TrainSection, arch: str, build: ModelBuilder) -> dict[str, nn.Module]:
    return {"guide": build(cfg.dynat.guide_arch or arch)}


def dynat_guide_lr(cfg: TrainSection, name: str) -> float:
    return cfg.dynat.guide_lr if cfg.dynat.guide_lr is not None else cfg.lr


@recipe(
    "dynat",
    "dynamic-label adversarial training: target trained on adversarial examples against a clean guide's labels",
    extra_modules=dynat_extras,
    extra_lr=dynat_guide_lr,
    options=("dynat", "awp"),
)
def dynat(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    """loss = CE(target(x_adv), argmax guide(x)) + balance * CE(guide(x), y).

    The adversarial examples maximize the target's cross-entropy against the ground truth, or, with
    ``dynat.inner``, against the guide's dynamic labels (the paper's inner optimization). The two terms
    touch disjoint parameters; ``balance`` scales the guide's gradient.
    """
    guide = ctx.extras["guide"]
    guide_logits = guide(x)
    labels = dynamic_labels(guide_logits)
    x_adv = attack_pgd(ctx, x, labels if ctx.cfg.dynat.inner else y)
    logits_adv = ctx.model(x_adv)
    target_loss = F.cross_entropy(logits_adv, labels)
    guide_loss = F.cross_entropy(guide_logits, y)
    metrics = {
        "target_loss": target_loss.item(),
        "guide_loss": guide_loss.item(),
        "guide_acc": _acc(guide_logits, y),
        "adv_acc": _acc(logits_adv, y),
    }
    return StepOutput(target_loss + ctx.cfg.dynat.balance * guide_loss, metrics, labels)


@torch.no_grad()
def heldout_bits_per_dim(model: nn.Module, images: torch.Tensor, cfg: TrainSection) -> dict[str, float]:
    """The density model's mean bits per dimension on ``images`` (in batches of ``train.eval.batch_size``)."""
    total = sum(float(bits_per_dim(model(x), x)) * len(x) for x in images.split(cfg.eval.batch_size))
    return {"heldout_bits_per_dim": total / len(images)}


@recipe(
    "pixelcnn",
    "a PixelCNN density model of the training images (negative log-likelihood in bits per dimension), for PixelDefend",
    adversarial=False,
    models=DENSITY_MODELS,
    evaluate=heldout_bits_per_dim,
)
def pixelcnn(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
    loss = bits_per_dim(ctx.model(x), x)
    return StepOutput(loss, {"bits_per_dim": loss.item()}, y)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.detach().argmax(dim=1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------------------
# Detector recipes: fitted around a trained model by dent.training.detectors, not by the epoch loop


def detector_recipe(name: str, description: str, detector: str) -> None:
    RECIPES.register(name, Recipe(name, description, None, adversarial=False, options=("detector",),
                                  detector=detector))


detector_recipe("kde_detector", "detector: kernel density + MC-dropout uncertainty, logistic regression (Feinman "
                "et al. 2017) on a trained model's clean vs PGD examples", "kde_uncertainty")
detector_recipe("subnetwork_detector", "detector: a subnetwork on a hidden layer of a trained model (Metzen et al. "
                "2017), trained on its clean vs PGD examples", "subnetwork")
