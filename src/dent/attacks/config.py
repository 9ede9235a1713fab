"""The ``attack`` config section: which attack, which threat models (norm, epsilon), which budget.

One :class:`AttackSection` describes a grid of *attack points*: every threat (norm, epsilon) times every
value of the iteration sweep. Each :class:`AttackPoint` is one fully resolved attack setting; it is what a
unit of work runs and what its content hash covers.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, Field, field_validator, model_validator

from dent.attacks.adaptive_config import ADAPTIVE_ATTACKS, AdaptiveSection, point_tag
from dent.confbase import OMITTED_AT_DEFAULT, Section
from dent.threat import PixelFloat, ThreatModel, check_eps, format_eps, parse_threat


class AAVersion(str, Enum):
    """AutoAttack's versions (pyautoattack's ``version``); ``custom`` runs ``attack.attacks``."""

    STANDARD = "standard"
    PLUS = "plus"
    RAND = "rand"
    CUSTOM = "custom"


class AttackMode(str, Enum):
    """How an attack list is run on a batch."""

    ENSEMBLE = "ensemble"  # AutoAttack's cumulative ensemble: each attack only sees the still-robust points
    INDIVIDUAL = "individual"  # every attack separately on the whole batch (per-attack accuracy, Table 2)
    BOTH = "both"  # both of the above


class PGDLoss(str, Enum):
    """The objective PGD ascends (``attack.loss``)."""

    CE = "ce"  # cross-entropy (Madry et al.)
    # The logit margin max_{j != y} Z_j - Z_y (Carlini & Wagner 2017): unlike cross-entropy, its gradient does
    # not vanish where the softmax saturates (defensive distillation's temperature-scaled logits).
    MARGIN = "margin"


class PGDGradient(str, Enum):
    """The gradient PGD follows (``attack.gradient``)."""

    PLAIN = "plain"  # the defended model's own gradient, one draw of a random defense
    # what the defense's declarations call for (dent.attacks.wrappers.attack_view): BPDA through its surrogate
    # where it is not differentiable, the mean over attack.eot_iter draws (EOT) where it is randomized
    DECLARED = "declared"


#: Attack names whose points run AutoAttack (``version`` / ``attacks``); ``transfer`` runs it on a source model.
AUTOATTACK_BASED = ("autoattack", "transfer")

#: The attacks pyautoattack 0.2.0 knows, by its names.
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")

#: The attack list of each AutoAttack version (as set by pyautoattack's ``_set_version``).
VERSION_ATTACKS = {
    AAVersion.STANDARD: ("apgd-ce", "apgd-t", "fab-t", "square"),
    AAVersion.PLUS: ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    AAVersion.RAND: ("apgd-ce", "apgd-dlr"),
}

PositiveInt = Annotated[int, Field(ge=1)]

#: The attacks that read ``attack.loss`` and ``attack.gradient``.
LOSS_ATTACKS = ("pgd",)

#: The attacks that read ``attack.cw``, and the norm they attack in.
CW_ATTACKS = ("cw_l2",)
CW_NORM = ThreatModel.L2


class CWSection(Section):
    """``attack.cw``: the knobs of Carlini & Wagner's L2 attack (``attack.name cw_l2``; defaults theirs).

    Its Adam steps per binary-search step are ``attack.n_iter``.
    """

    search_steps: PositiveInt = 9  # binary-search steps over the constant c, per point
    initial_const: Annotated[float, Field(gt=0)] = 1e-3  # c of the first search step
    confidence: Annotated[float, Field(ge=0)] = 0.0  # kappa: the logit margin an adversarial must reach
    lr: Annotated[float, Field(gt=0)] = 1e-2  # Adam's learning rate on w (the tanh variable)


class Threat(Section):
    """A norm ball: the norm and its radius epsilon, in the [0, 1] pixel scale."""

    norm: ThreatModel = ThreatModel.LINF
    eps: PixelFloat = 8 / 255

    @model_validator(mode="after")
    def _eps_in_range(self) -> "Threat":
        check_eps(self.norm, self.eps)
        return self

    @property
    def label(self) -> str:
        return f"{self.norm.value} {format_eps(self.eps, self.norm)}"


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _threat_list(value: Any) -> Any:
    return [parse_threat(v) for v in _as_list(value)]


class AttackPoint(Section):
    """One resolved attack setting: what a unit of work runs. Built by :meth:`AttackSection.points`."""

    name: str
    version: Optional[AAVersion] = None  # AutoAttack only
    attacks: tuple[str, ...] = ()  # AutoAttack's resolved attack list
    mode: AttackMode = AttackMode.ENSEMBLE
    norm: ThreatModel
    eps: float
    n_iter: Optional[int] = None  # None: the attack's default
    n_restarts: Optional[int] = None
    n_target_classes: Optional[int] = None
    n_queries: Optional[int] = None
    eot_iter: Optional[int] = None
    step_size: Optional[float] = None  # PGD only
    random_start: bool = True  # PGD only
    # Adaptive attacks only (dent.attacks.adaptive); omitted at its default, so points of other attacks keep
    # the unit keys they had before adaptive attacks existed.
    adaptive: Annotated[Optional[AdaptiveSection], OMITTED_AT_DEFAULT] = None
    # Added later, omitted at their defaults for the same reason: PGD's objective, and cw_l2's knobs (its
    # points always carry them; other attacks' points None).
    loss: Annotated[PGDLoss, OMITTED_AT_DEFAULT] = PGDLoss.CE
    cw: Annotated[Optional[CWSection], OMITTED_AT_DEFAULT] = None
    gradient: Annotated[PGDGradient, OMITTED_AT_DEFAULT] = PGDGradient.PLAIN  # PGD only

    @property
    def threat_label(self) -> str:
        return f"{self.norm.value} {format_eps(self.eps, self.norm)}"

    @property
    def label(self) -> str:
        """A short human label, e.g. ``AA-custom(apgd-ce,apgd-t) Linf 1.5/255 iter=10``, ``PGD-margin L2 0.5``."""
        if self.name == "autoattack":
            what = f"AA-{self.version.value}" if self.version else "AA"
            if self.version == AAVersion.CUSTOM:
                what += "(" + ",".join(self.attacks) + ")"
        elif self.adaptive is not None:
            what = point_tag(self.name, self.adaptive)
            if self.name == "transfer":
                what += f"[AA-{self.version.value}" + (
                    "(" + ",".join(self.attacks) + ")" if self.version == AAVersion.CUSTOM else "") + "]"
        else:
            what = self.name.upper()
            if self.n_restarts and self.n_restarts > 1:
                what += f"x{self.n_restarts}"
            if self.loss is not PGDLoss.CE:
                what += f"-{self.loss.value}"
            if self.gradient is not PGDGradient.PLAIN:
                what += "-bpda/eot"
        out = f"{what} {self.threat_label}"
        if self.n_iter is not None:
            out += f" iter={self.n_iter}"
        return out


class AttackSection(Section):
    """Settings of the attack: the ``attack`` section of a run config.

    Defaults are the standard AutoAttack at Linf 8/255 (the paper's Table 1 protocol). Budget keys
    (``n_iter``, ``n_restarts``, ``n_target_classes``, ``n_queries``) left at ``null`` keep the version's
    own settings; set them to run a reduced attack on a CPU.
    """

    # a name in dent.attacks.ATTACKS: autoattack | pgd | an adaptive attack (below) | declared_apgd (any defense,
    # BPDA / EOT as its declared traits call for: dent.attacks.wrappers) | cw_l2 (Carlini & Wagner's minimal-L2
    # attack, L2 threats only: dent.attacks.cw)
    name: str = "autoattack"
    version: AAVersion = AAVersion.STANDARD  # AutoAttack version; custom runs `attacks`
    attacks: list[str] = Field(default_factory=list)  # custom AutoAttack list, e.g. [apgd-ce, apgd-t]
    mode: AttackMode = AttackMode.ENSEMBLE  # ensemble | individual | both (per-attack, Table 2)
    # ThreatModel balls to attack in, each NORM:EPS or {norm, eps}; several give the accuracy-vs-epsilon curve.
    threats: Annotated[list[Threat], BeforeValidator(_threat_list)] = Field(
        default_factory=lambda: [Threat(norm=ThreatModel.LINF, eps=8 / 255)]
    )
    # Attack iterations (APGD, FAB, PGD); a list is an iteration sweep (Table 10); [] keeps the default.
    n_iter: Annotated[list[PositiveInt], BeforeValidator(_as_list)] = Field(default_factory=list)
    n_restarts: Optional[PositiveInt] = None  # APGD-CE/DLR, FAB and PGD restarts
    n_target_classes: Optional[PositiveInt] = None  # APGD-T and FAB-T target classes
    n_queries: Optional[PositiveInt] = None  # Square's query budget
    eot_iter: Optional[PositiveInt] = None  # expectation-over-transformation samples (version rand)
    step_size: Optional[PixelFloat] = None  # PGD step; default 2.5 * eps / n_iter
    random_start: bool = True  # PGD starts from a random point in the ball
    # Adaptive attacks (transfer | mixed | through_adaptation | bpda_eot | surrogate_transfer | batch_mates):
    # their knobs (dent.attacks.adaptive_config.AdaptiveSection); null = its defaults.
    adaptive: Annotated[Optional[AdaptiveSection], OMITTED_AT_DEFAULT] = None  # (keeps earlier run hashes)
    # PGD's objective: ce (cross-entropy) | margin (the C&W logit margin, for saturated softmaxes).
    loss: Annotated[PGDLoss, OMITTED_AT_DEFAULT] = PGDLoss.CE
    # cw_l2's binary search and Adam (CWSection); null = its defaults. attack.n_iter: Adam steps per search step.
    cw: Annotated[Optional[CWSection], OMITTED_AT_DEFAULT] = None
    # PGD's gradient: plain (the defense's own) | declared (BPDA / EOT as the defense declares, PGDGradient)
    gradient: Annotated[PGDGradient, OMITTED_AT_DEFAULT] = PGDGradient.PLAIN

    @field_validator("name")
    @classmethod
    def _known_attack(cls, value: str) -> str:
        from dent.attacks.registry import ATTACKS
        from dent.errors import UnknownNameError

        try:
            return ATTACKS.canonical(value)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("attacks")
    @classmethod
    def _known_sub_attacks(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            key = str(name).lower()
            if key not in AUTOATTACK_ATTACKS:
                raise ValueError(f"unknown AutoAttack attack {name!r}; valid names: {', '.join(AUTOATTACK_ATTACKS)}")
            if key in out:
                raise ValueError(f"attack {name!r} is listed twice")
            out.append(key)
        return out

    @field_validator("threats")
    @classmethod
    def _some_threat(cls, value: list[Threat]) -> list[Threat]:
        if not value:
            raise ValueError("at least one threat (NORM:EPS) is needed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "AttackSection":
        if self.name in AUTOATTACK_BASED:
            if self.version == AAVersion.CUSTOM and not self.attacks:
                raise ValueError("attack.version custom needs a list in attack.attacks, e.g. [apgd-ce, apgd-t]")
            if self.version != AAVersion.CUSTOM and self.attacks:
                raise ValueError(
                    f"attack.attacks is only used with attack.version custom (version is {self.version.value}); "
                    "set attack.version custom or drop attack.attacks"
                )
        elif self.attacks:
            raise ValueError(f"attack.attacks lists AutoAttack attacks, but attack.name is {self.name}")
        if self.loss is not PGDLoss.CE and self.name not in LOSS_ATTACKS:
            hint = (" (AutoAttack's margin losses: attack.version custom, attack.attacks [apgd-dlr] or [apgd-t])"
                    if self.name in AUTOATTACK_BASED else "")
            raise ValueError(f"attack.loss {self.loss.value} is read only by attack.name {' | '.join(LOSS_ATTACKS)}; "
                             f"attack.name {self.name} ignores it{hint}")
        if self.gradient is not PGDGradient.PLAIN and self.name not in LOSS_ATTACKS:
            raise ValueError(f"attack.gradient {self.gradient.value} is read only by attack.name "
                             f"{' | '.join(LOSS_ATTACKS)}; attack.name {self.name} ignores it (declared_apgd and "
                             "cw_l2 always follow the declared gradient)")
        if self.cw is not None and self.name not in CW_ATTACKS:
            raise ValueError(f"attack.cw is read only by attack.name {' | '.join(CW_ATTACKS)}; "
                             f"attack.name {self.name} ignores it")
        if self.name in CW_ATTACKS:
            other = [t.label for t in self.threats if t.norm is not CW_NORM]
            if other:
                raise ValueError(
                    f"attack.name {self.name} is an {CW_NORM.value} attack, but attack.threats has {', '.join(other)}; "
                    f"give {CW_NORM.value} threats, e.g. attack.threats {CW_NORM.value}:0.5")
        return self

    def attack_list(self) -> tuple[str, ...]:
        if self.name not in AUTOATTACK_BASED:
            return ()
        if self.version == AAVersion.CUSTOM:
            return tuple(self.attacks)
        return VERSION_ATTACKS[self.version]

    def points(self) -> list[AttackPoint]:
        """Every (threat, iteration) point of the grid, in config order."""
        iters: list[Optional[int]] = list(self.n_iter) or [None]
        out = []
        for threat in self.threats:
            for n_iter in iters:
                out.append(
                    AttackPoint(
                        name=self.name,
                        version=self.version if self.name in AUTOATTACK_BASED else None,
                        attacks=self.attack_list(),
                        mode=self.mode,
                        norm=threat.norm,
                        eps=threat.eps,
                        n_iter=n_iter,
                        n_restarts=self.n_restarts,
                        n_target_classes=self.n_target_classes,
                        n_queries=self.n_queries,
                        eot_iter=self.eot_iter,
                        step_size=self.step_size if self.name == "pgd" else None,
                        random_start=self.random_start if self.name == "pgd" else True,
                        adaptive=(self.adaptive or AdaptiveSection()).for_attack(self.name)
                        if self.name in ADAPTIVE_ATTACKS else None,
                        loss=self.loss,
                        cw=(self.cw or CWSection()) if self.name in CW_ATTACKS else None,
                        gradient=self.gradient,
                    )
                )
        return out

