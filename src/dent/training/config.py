"""The config of ``dent train``: the ``train`` section (recipe, optimization, the training adversary, evaluation)
and :class:`TrainConfig`, which composes it with the architecture, the data source and the seed.

Every key can be set from a YAML file (``cfgs/train/*.yaml``) or on the command line (``train.attack.eps 8/255``).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from dent.confbase import NON_RESULT, OMITTED_AT_DEFAULT, Section, config_hash
from dent.identity import result_tree
from dent.sections import ArchSection, CommandConfig, DataSourceSection, DeviceName
from dent.threat import CIFAR_INPUT_DIM, PixelFloat, ThreatModel, check_eps

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction01 = Annotated[float, Field(ge=0, le=1)]

class BnMode(str, Enum):
    """The mode a model is put in while adversarial training examples are generated against it."""

    EVAL = "eval"  # running statistics, no buffer updates (TRADES reference code)
    TRAIN = "train"  # batch statistics, running buffers updated by every attack step (Madry/Rice/Wong code)


class Schedule(str, Enum):
    COSINE = "cosine"  # half-period cosine from lr to 0 (the paper's nominal recipe, pycls)
    CYCLIC = "cyclic"  # triangular one-cycle: 0 -> lr at `cycle_peak` of training -> 0 (Wong et al. 2020)
    PIECEWISE = "piecewise"  # lr, divided by 10 at 50% and 75% of training (Madry et al. / Rice et al.)
    CONSTANT = "constant"


class Backend(str, Enum):
    """The torch.distributed backend of a run under torchrun (dent.training.distributed)."""

    AUTO = "auto"  # NCCL on CUDA, gloo on the CPU
    GLOO = "gloo"
    NCCL = "nccl"


class DistributedSection(Section):
    """``dent train`` under ``torchrun --nproc_per_node N``; the world size and ranks come from torchrun's
    environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), ``train.batch_size`` is the global batch."""

    backend: Backend = Backend.AUTO


class OptimizerName(str, Enum):
    SGD = "sgd"  # with train.momentum and train.nesterov (every classifier recipe)
    ADAM = "adam"  # default betas; train.momentum and train.nesterov are not read (the PixelCNN recipe)


def default_step(norm: ThreatModel, eps: float) -> float:
    """The usual PGD step: eps/4 for Linf (2/255 at 8/255), eps/5 for L2 (0.1 at 0.5)."""
    return eps / 4 if norm is ThreatModel.LINF else eps / 5


class TrainAttackSection(Section):
    """The adversary that makes training examples (PGD, FGSM, TRADES, ALP, DYNAT)."""

    norm: ThreatModel = ThreatModel.LINF
    eps: PixelFloat = 8 / 255
    step: Optional[PixelFloat] = None  # default: eps/4 (Linf) or eps/5 (L2)
    steps: Annotated[int, Field(ge=1, le=1000)] = 10
    random_start: bool = True
    fgsm_step_scale: Annotated[float, Field(gt=0, le=10)] = 1.25  # FGSM-RS step = scale * eps (Wong et al.)
    bn_mode: BnMode = BnMode.EVAL

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, value: float, info: ValidationInfo) -> float:
        if "norm" in info.data:
            check_eps(info.data["norm"], value, CIFAR_INPUT_DIM)
        return value

    @field_validator("step")
    @classmethod
    def _positive_step(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not value > 0:
            raise ValueError(f"expected a step size > 0, got {value:g}")
        return value

    @property
    def step_size(self) -> float:
        return self.step if self.step is not None else default_step(self.norm, self.eps)


class EvalSection(Section):
    """Per-epoch clean and PGD accuracy on the held-out images carved from the training split."""

    every: Annotated[int, Field(ge=0)] = 1  # epochs between evaluations (the last epoch always); 0: only the last
    norm: Optional[ThreatModel] = None  # default: train.attack.norm
    eps: Optional[PixelFloat] = None  # default: train.attack.eps
    step: Optional[PixelFloat] = None  # default: eps/4 (Linf) or eps/5 (L2)
    steps: Annotated[int, Field(ge=1, le=1000)] = 10
    batch_size: PositiveInt = 256
    seed: int = 0  # seed of the PGD random start, the same every epoch so epochs are comparable


class TradesSection(Section):
    beta: NonNegativeFloat = 6.0  # weight of the KL robustness term (Zhang et al. 2019)


class AlpSection(Section):
    """Adversarial logit pairing (Kannan et al. 2018) on PGD training."""

    weight: NonNegativeFloat = 0.5  # lambda of the logit-pairing term: mean squared difference of logits
    clean_weight: Fraction01 = 0.5  # alpha: loss = alpha CE(x) + (1 - alpha) CE(x_adv) + lambda ||Z(x) - Z(x_adv)||^2


class DynatSection(Section):
    """Dynamic-label adversarial training (DYNAT): a guide model trained on clean data alongside the target."""

    guide_arch: Optional[str] = None  # default: model.arch
    balance: NonNegativeFloat = 1.0  # gamma: loss = CE(target(x_adv), guide labels) + gamma CE(guide(x), y)
    inner: bool = False  # attack with the guide's dynamic labels instead of the ground truth (inner optimization)
    guide_lr: Optional[Annotated[float, Field(gt=0)]] = None  # default: train.lr (same schedule)


class DistillationSection(Section):
    """Defensive distillation (Papernot et al. 2016): a teacher trained at softmax temperature T (recipe
    ``temperature``), a student trained at T on the teacher's soft labels (recipe ``distillation``); both are
    deployed at temperature 1, where their softmax saturates."""

    temperature: Annotated[float, Field(gt=0, le=1000)] = 20.0
    # the student's teacher: a named model (`dent models`) or a `dent train` run directory / its checkpoint.pt
    teacher: Optional[str] = None


class PenaltyKind(str, Enum):
    """What the ``gradient_penalty`` recipe penalizes, besides the cross-entropy."""

    INPUT_GRADIENT = "input_gradient"  # ||grad_x CE(f(x), y)||^2 (Ross & Doshi-Velez 2018)
    JACOBIAN = "jacobian"  # ||d logits / dx||_F^2, by random projections (the contractive penalty of Gu & Rigazio's DCN)


class GradientPenaltySection(Section):
    """Gradient regularization: loss = CE(f(x), y) + weight * penalty, averaged over the batch."""

    kind: PenaltyKind = PenaltyKind.INPUT_GRADIENT
    weight: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    projections: Annotated[int, Field(ge=1, le=100)] = 1  # jacobian: random unit projections per image


class AwpSection(Section):
    """Adversarial weight perturbation (Wu et al. 2020): each step, the weights of every convolution and linear
    layer are moved by ``gamma`` times their norm along the gradient of the recipe's loss, the model is updated
    with the gradient taken there, and the perturbation is removed."""

    gamma: Annotated[float, Field(ge=0, le=1)] = 0.0  # the radius relative to each layer's weight norm; 0: off
    warmup: Annotated[int, Field(ge=0)] = 0  # epochs trained without AWP first

    def active(self, epoch: int) -> bool:
        return self.gamma > 0 and epoch > self.warmup


def _layer_name(value: object) -> object:
    """A layer name as YAML reads it: ``1`` (an ``nn.Sequential``'s layer) is the name ``"1"``."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DetectorSection(Section):
    """``train.detector``: the detector recipes (``kde_detector``, ``subnetwork_detector``). The detector watches
    the trained model ``model.arch`` names (`dent models`), is fitted on ``train.n_images`` training images and
    their PGD examples (``train.attack``), and its threshold is set at ``fpr`` on the held-out clean images."""

    fpr: Annotated[float, Field(gt=0, lt=1)] = 0.05  # the clean false-positive rate of the threshold
    # kde_detector (Feinman et al. 2017): Gaussian kernel bandwidth on the last hidden features, MC-dropout passes
    bandwidth: Annotated[float, Field(gt=0)] = 1.0
    passes: Annotated[int, Field(ge=2, le=1000)] = 50
    dropout: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # subnetwork_detector (Metzen et al. 2017): the watched layer (a name in the model's named_modules), the
    # subnetwork's width, and its Adam training on the fixed clean + adversarial set
    layer: Annotated[Optional[str], BeforeValidator(_layer_name)] = None
    width: PositiveInt = 32
    epochs: PositiveInt = 20
    lr: Annotated[float, Field(gt=0)] = 1e-3


class DropRule(str, Enum):
    """How ``train.early_stop.drop`` measures a fall of held-out PGD accuracy between two epochs."""

    ABSOLUTE = "absolute"  # in accuracy points: 0.2 stops on 40% -> 19%, never on 12% -> 0% (Wong et al.)
    RELATIVE = "relative"  # as a fraction of the previous accuracy: 0.5 stops on 12% -> 5.9%, at any level

    def fell(self, previous: float, current: float, drop: float) -> bool:
        floor = previous - drop if self is DropRule.ABSOLUTE else previous * (1 - drop)
        return current < floor


class EarlyStopSection(Section):
    """Stop on catastrophic overfitting (Wong et al. 2020): held-out PGD accuracy collapses between epochs."""

    enabled: bool = False
    drop: Annotated[float, Field(gt=0, le=1)] = 0.2  # stop when PGD accuracy falls by more than this since last epoch
    # Added after runs were stored: omitted from the training hash at its default (earlier runs keep theirs).
    rule: Annotated[DropRule, OMITTED_AT_DEFAULT] = DropRule.ABSOLUTE
    n_images: PositiveInt = 256  # the held-out batch checked (the first images of the held-out split)


def _readers(options: list[str]) -> dict[str, tuple[str, ...]]:
    """The recipes that read each of ``options`` (the recipes module is imported only when there are some: it
    imports this one)."""
    if not options:
        return {}
    from dent.training.recipes import option_readers

    return {option: option_readers()[option] for option in options}


def _trains_a_density_model(recipe: str) -> bool:
    from dent.training.recipes import RECIPES

    return RECIPES.get(recipe).models is not None


#: The ``train`` sections that belong to recipes (each read by the recipes that name it in ``Recipe.options``).
RECIPE_OPTIONS = ("trades", "alp", "dynat", "distillation", "gradient_penalty", "awp", "detector")


class TrainSection(Section):
    """Everything ``dent train`` needs beyond ``model.arch``, ``data.dataset``/``data.dir`` and ``seed``."""

    recipe: str = "nominal"  # a name in dent.training.recipes.RECIPES
    epochs: PositiveInt = 200
    batch_size: PositiveInt = 128
    n_images: Optional[PositiveInt] = None  # training images (class-stratified); default: all but the held-out ones
    holdout: PositiveInt = 1000  # held-out images carved from the train split for per-epoch accuracy
    holdout_seed: int = 0
    augment: bool = True  # random crop (4-px zero padding) + horizontal flip, on tensors
    # Added after runs were stored: omitted from the training hash at its default (earlier runs keep theirs).
    optimizer: Annotated[OptimizerName, OMITTED_AT_DEFAULT] = OptimizerName.SGD
    lr: Annotated[float, Field(gt=0)] = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Schedule = Schedule.COSINE
    cycle_peak: Annotated[float, Field(gt=0, lt=1)] = 0.5  # cyclic schedule: fraction of training at the peak lr
    attack: TrainAttackSection = TrainAttackSection()
    eval: EvalSection = EvalSection()
    trades: TradesSection = TradesSection()
    alp: AlpSection = AlpSection()
    dynat: DynatSection = DynatSection()
    # Added after runs were stored: omitted from the training hash at their defaults (earlier runs keep theirs).
    distillation: Annotated[DistillationSection, OMITTED_AT_DEFAULT] = DistillationSection()
    gradient_penalty: Annotated[GradientPenaltySection, OMITTED_AT_DEFAULT] = GradientPenaltySection()
    awp: Annotated[AwpSection, OMITTED_AT_DEFAULT] = AwpSection()
    detector: Annotated[DetectorSection, OMITTED_AT_DEFAULT] = DetectorSection()
    early_stop: EarlyStopSection = EarlyStopSection()
    distributed: Annotated[DistributedSection, NON_RESULT] = DistributedSection()  # how the ranks talk, not what
    resume: Annotated[bool, NON_RESULT] = False  # continue from the run directory's checkpoint (same as --resume)
    progress: Annotated[bool, NON_RESULT] = True  # tqdm progress bars

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        from dent.training.recipes import RECIPES  # deferred: recipes import torch and the adversaries

        if value not in RECIPES:
            raise ValueError(RECIPES.unknown_message(value))
        return RECIPES.canonical(value)

    @model_validator(mode="after")
    def _options_of_the_recipe(self) -> "TrainSection":
        """A recipe's option section (``trades``, ``awp``, ...) set away from its defaults for a recipe that
        does not read it is a mistake, not a no-op."""
        fields = type(self).model_fields
        changed = [name for name in RECIPE_OPTIONS if getattr(self, name) != fields[name].default]
        for option, recipes in _readers(changed).items():
            if self.recipe not in recipes:
                raise ValueError(
                    f"train.{option} applies to the recipe{'s' if len(recipes) > 1 else ''} {', '.join(recipes)}, "
                    f"not to train.recipe {self.recipe!r}; drop train.{option} or choose one of those recipes"
                )
        if self.early_stop.enabled and _trains_a_density_model(self.recipe):
            raise ValueError(f"train.early_stop watches held-out PGD accuracy, which the density model of train.recipe "
                             f"{self.recipe} does not have; drop train.early_stop.enabled")
        if self.recipe == "subnetwork_detector" and not self.detector.layer:
            raise ValueError("train.recipe subnetwork_detector needs train.detector.layer: the name of the layer "
                             "whose activations it reads (`dent models --layers NAME` lists them)")
        if self.recipe == "distillation" and not self.distillation.teacher:
            raise ValueError("train.recipe distillation needs train.distillation.teacher: a named model (`dent "
                             "models`) or a `dent train` run directory of the teacher (recipe temperature)")
        return self

    @model_validator(mode="after")
    def _eval_eps_in_range(self) -> "TrainSection":
        try:
            check_eps(self.eval_norm, self.eval_eps, CIFAR_INPUT_DIM)
        except ValueError as exc:
            raise ValueError(f"eval.eps: {exc}") from None
        if self.eval.step is not None and not self.eval.step > 0:
            raise ValueError(f"eval.step: expected a step size > 0, got {self.eval.step:g}")
        return self

    @property
    def eval_norm(self) -> ThreatModel:
        return self.eval.norm or self.attack.norm

    @property
    def eval_eps(self) -> float:
        return self.eval.eps if self.eval.eps is not None else self.attack.eps

    @property
    def eval_step(self) -> float:
        return self.eval.step if self.eval.step is not None else default_step(self.eval_norm, self.eval_eps)


class TrainConfig(CommandConfig):
    """The config of ``dent train``; its result tree (the *training config*) names the run and guards resume."""

    model: ArchSection = ArchSection()
    data: DataSourceSection = DataSourceSection()  # its train split
    train: TrainSection = TrainSection()
    device: Annotated[DeviceName, NON_RESULT] = "auto"
    seed: int = 0

    # The former all-commands config's keys that training never read.
    legacy_keys = ("defenses", "attack", "evaluation", "bench", "model.threat_model", "model.model_dir",
                   "model.checkpoint", "data.split", "data.n_images", "data.seed", "data.batch_size")

    def result_hash(self) -> str:
        """The training hash: of the nested result tree (not flattened like evaluation hashes), as always, so
        checkpoints and run directories of earlier runs keep theirs."""
        return config_hash(result_tree(self))
