"""Settings of the adaptive attacks on dent: the ``attack.adaptive`` config section.

The adaptive attacks are selected by ``attack.name`` (see :mod:`dent.attacks.adaptive`):

* ``transfer`` (the paper's "denied updates", Table 5): AutoAttack (``attack.version`` / ``attack.attacks``)
  against a source model (``adaptive.sources``, default the static model), its adversarial inputs then
  submitted to the defense;
* ``mixed`` (Table 6): adversarial inputs mixed with natural ones in every batch the defense adapts on
  (``adaptive.mixed``); accuracy on the adversarial part;
* ``through_adaptation``: APGD whose gradient differentiates through the K adaptation steps;
* ``bpda_eot``: APGD on the defense's answers, with gradients of a shortened (``adaptive.short_steps``)
  differentiable defense, averaged over ``attack.eot_iter`` noisy copies (``adaptive.eot_noise``);
* ``surrogate_transfer``: targeted APGD-DLR with restarts against stronger surrogates (the static model,
  a shortened differentiable defense), every candidate submitted to the defense;
* ``batch_mates`` (:mod:`dent.attacks.batch_mates`): ``adaptive.batch_mates`` malicious inputs added to every
  batch, optimized through the adaptation to flip the unperturbed benign batch-mates' answers.

The APGD budget is ``attack.n_iter`` / ``attack.n_restarts`` / ``attack.n_target_classes`` /
``attack.eot_iter`` (defaults below). Each attack's unit key covers only the keys that attack reads.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator

from dent.confbase import OMITTED_AT_DEFAULT, Section
from dent.threat import PixelFloat

#: The adaptive attack names, as registered in :data:`dent.attacks.ATTACKS`.
ADAPTIVE_ATTACKS = ("transfer", "mixed", "through_adaptation", "bpda_eot", "surrogate_transfer", "batch_mates")

#: The APGD variants the adaptive attacks run (pyautoattack's names).
APGD_VARIANTS = ("apgd-ce", "apgd-dlr", "apgd-t")

#: Default sub-attacks per adaptive attack (``adaptive.attacks: []``).
DEFAULT_SUB_ATTACKS = {
    "mixed": ("apgd-ce", "apgd-t"),
    "through_adaptation": ("apgd-ce", "apgd-t"),
    "bpda_eot": ("apgd-ce", "apgd-t"),
    "surrogate_transfer": ("apgd-t",),
}

#: APGD budget when ``attack.n_iter`` / ``n_restarts`` / ``n_target_classes`` are not set (AutoAttack's).
DEFAULT_N_ITER = 100
DEFAULT_N_RESTARTS = {"surrogate_transfer": 3}  # others: 1
DEFAULT_N_TARGET_CLASSES = 9

#: The keys of :class:`AdaptiveSection` each attack reads (the rest are reset in its attack points).
RELEVANT_KEYS = {
    "transfer": ("sources", "short_steps", "static_autocast"),
    "mixed": ("attacks", "mixed", "mixed_batch_size"),
    "through_adaptation": ("attacks", "horizon", "checkpoint"),
    "bpda_eot": ("attacks", "short_steps", "eot_noise", "checkpoint"),
    "surrogate_transfer": ("attacks", "sources", "short_steps", "checkpoint", "static_autocast"),
    "batch_mates": ("batch_mates", "batch_mates_eps", "checkpoint"),
}


class Source(str, Enum):
    """What a transfer attack optimizes against."""

    STATIC = "static"  # the wrapped model without adaptation
    SHORTENED = "shortened"  # the defense with adaptive.short_steps steps, differentiated through its updates
    # The fixed part of dent with Sigma: the wrapped model behind dent's input blur at its initial width
    # (sigma_init), or at the width dent adapts to on the natural batch (per-input widths: their median).
    # On a defense without a blur both are the static model.
    BLUR = "blur"
    ADAPTED_BLUR = "adapted_blur"


DEFAULT_SOURCES = {"transfer": (Source.STATIC,), "surrogate_transfer": (Source.STATIC, Source.SHORTENED)}


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


MixEntry = Union[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0, lt=1)]]


class AdaptiveSection(Section):
    """``attack.adaptive``: knobs of the adaptive attacks (ignored by autoattack and pgd)."""

    # APGD variants to run (apgd-ce | apgd-dlr | apgd-t); [] = the attack's default (DEFAULT_SUB_ATTACKS).
    attacks: list[str] = Field(default_factory=list)
    # transfer / surrogate_transfer: what to attack (static | shortened | blur | adapted_blur); [] = the
    # attack's default.
    sources: list[Source] = Field(default_factory=list)
    # Steps of the shortened defense (bpda_eot's gradient, the 'shortened' source); at most the defense's.
    short_steps: Annotated[int, Field(ge=1)] = 2
    # mixed: adversarial share of every adapted batch, each a count (an integer >= 1, e.g. 1 = one
    # adversarial input per batch) or a fraction in (0, 1); one result label per entry (Table 6). Every
    # input is attacked once per entry, so an entry costs batch/count whole-batch attacks (1 in 16: 16x).
    # The paper's single adversarial input was in batches of 16: mixed [1] with mixed_batch_size 16.
    mixed: list[MixEntry] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    # mixed: size of the batches the defense adapts on; null = the evaluation batch (data.batch_size).
    mixed_batch_size: Optional[Annotated[int, Field(ge=2)]] = None
    # through_adaptation: differentiate only the last `horizon` adaptation steps (truncated); null = all.
    horizon: Optional[Annotated[int, Field(ge=0)]] = None
    # Recompute each differentiated step in the backward pass instead of storing it (less memory, same result).
    checkpoint: bool = False
    # bpda_eot: std of the Gaussian noise added to each EOT sample (pixel scale); 0 = no noise (and EOT
    # then defaults to 1 sample). attack.eot_iter sets the samples (default 4).
    eot_noise: Annotated[PixelFloat, Field(ge=0)] = 1 / 255
    # transfer / surrogate_transfer from the static model: its forward and backward under bf16 autocast
    # (opt-in fast path, on hardware with native bf16: docs/performance.md). Other gradients, so other
    # adversarial inputs: a result key. The defense itself runs as its own config says; the shortened
    # defense (BPDA, shortened sources) follows the defense's `autocast`.
    static_autocast: Annotated[Literal["none", "bfloat16"], OMITTED_AT_DEFAULT] = "none"
    # batch_mates: malicious inputs added to every evaluation batch of n benign ones (the defense adapts on
    # n + k), one result label per count k. Added later, so omitted at their defaults (earlier unit keys hold).
    batch_mates: Annotated[list[int], OMITTED_AT_DEFAULT] = Field(default_factory=lambda: [1, 2, 4, 8])
    # batch_mates: Linf bound of the malicious inputs around natural images of the batch; null = any image in
    # [0, 1] (nothing constrains a stranger's request in a shared service).
    batch_mates_eps: Annotated[Optional[Annotated[PixelFloat, Field(gt=0, le=1)]], OMITTED_AT_DEFAULT] = None

    @field_validator("attacks", mode="before")
    @classmethod
    def _list_of_attacks(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            key = str(name).lower()
            if key not in APGD_VARIANTS:
                raise ValueError(f"unknown APGD variant {name!r}; valid names: {', '.join(APGD_VARIANTS)}")
            if key in out:
                raise ValueError(f"attack {name!r} is listed twice")
            out.append(key)
        return out

    @field_validator("sources", "mixed", "batch_mates", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("mixed")
    @classmethod
    def _distinct_mix(cls, value: list) -> list:
        if not value:
            raise ValueError("at least one adversarial share is needed, e.g. [1, 0.1, 0.5]")
        labels = [mix_label(v) for v in value]
        if len(set(labels)) != len(labels):
            raise ValueError(f"adversarial shares are listed twice: {value}")
        return value

    @field_validator("batch_mates")
    @classmethod
    def _distinct_counts(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one count of malicious inputs is needed, e.g. [1, 2, 4, 8]")
        small = [k for k in value if k < 1]
        if small:
            raise ValueError(f"counts of malicious inputs per batch must be >= 1, got {small}")
        if len(set(value)) != len(value):
            raise ValueError(f"counts of malicious inputs are listed twice: {value}")
        return value

    def for_attack(self, name: str) -> "AdaptiveSection":
        """This section with the keys ``name`` does not read reset to their defaults (for unit keys)."""
        keep = RELEVANT_KEYS.get(name, ())
        return AdaptiveSection.model_validate({k: v for k, v in self.to_dict().items() if k in keep})

    def sub_attacks(self, name: str) -> tuple[str, ...]:
        return tuple(self.attacks) or DEFAULT_SUB_ATTACKS.get(name, ())

    def source_list(self, name: str) -> tuple[Source, ...]:
        return tuple(self.sources) or DEFAULT_SOURCES.get(name, ())


def mix_label(entry: float | int) -> str:
    """``1`` -> ``1 adv``; ``0.1`` -> ``10%``."""
    if isinstance(entry, int) or float(entry) >= 1:
        return f"{int(entry)} adv"
    return f"{100 * float(entry):g}%"


def adv_count(entry: float | int, batch: int) -> int:
    """Adversarial inputs in a batch of ``batch`` for a ``mixed`` entry: a count, or a rounded fraction (>= 1)."""
    if isinstance(entry, int) or float(entry) >= 1:
        n = int(entry)
    else:
        n = int(round(float(entry) * batch))
    return max(1, min(n, batch))


def _pixels(value: float) -> str:
    """``1/255`` for values on the half 1/255 grid, else the number."""
    scaled = round(value * 510) / 2
    return f"{scaled:g}/255" if abs(value * 255 - scaled) < 1e-6 else f"{value:.4g}"


def point_tag(name: str, adaptive: dict[str, Any] | AdaptiveSection) -> str:
    """A short tag of an adaptive attack point, for labels: ``THROUGH_ADAPTATION(apgd-ce,apgd-t)``."""
    a = adaptive if isinstance(adaptive, AdaptiveSection) else AdaptiveSection.model_validate(adaptive)
    parts = []
    if name in DEFAULT_SUB_ATTACKS:
        parts.append(",".join(a.sub_attacks(name)))
    if name in DEFAULT_SOURCES:
        parts.append("from " + "+".join(s.value for s in a.source_list(name)))
    if name == "mixed":
        parts.append("mix " + ",".join(mix_label(m) for m in a.mixed)
                     + (f" in {a.mixed_batch_size}" if a.mixed_batch_size else ""))
    if name == "through_adaptation" and a.horizon is not None:
        parts.append(f"horizon {a.horizon}")
    if name == "batch_mates":
        parts.append("mates " + ",".join(map(str, a.batch_mates)) + (
            f" within {_pixels(a.batch_mates_eps)}" if a.batch_mates_eps is not None else ""))
    if name == "bpda_eot" or (name in DEFAULT_SOURCES and Source.SHORTENED in a.source_list(name)):
        parts.append(f"short {a.short_steps}")
    if name == "bpda_eot" and a.eot_noise:
        parts.append(f"noise {_pixels(a.eot_noise)}")
    return f"{name.upper()}({'; '.join(parts)})"


def describe_point(point: dict[str, Any]) -> str:
    """The attack of an adaptive point without its threat, for report captions and tables."""
    name = point["name"]
    a = AdaptiveSection.model_validate(point["adaptive"])
    if name == "transfer":
        what = f"AutoAttack {point.get('version')}"
        if point.get("version") == "custom":
            what += " (" + ", ".join(point.get("attacks", ())) + ")"
        out = f"transfer of {what} from {'+'.join(s.value for s in a.source_list(name))}"
        if Source.SHORTENED in a.source_list(name):
            out += f" ({a.short_steps}-step defense)"
    elif name == "mixed":
        out = (f"mixed batches ({', '.join(mix_label(m) for m in a.mixed)}"
               + (f" in batches of {a.mixed_batch_size}" if a.mixed_batch_size else "") + ") of "
               + ", ".join(a.sub_attacks(name)))
    elif name == "through_adaptation":
        out = f"{', '.join(a.sub_attacks(name))} through the adaptation"
        if a.horizon is not None:
            out += f" (last {a.horizon} steps)"
    elif name == "bpda_eot":
        out = f"BPDA+EOT of {', '.join(a.sub_attacks(name))} via a {a.short_steps}-step defense"
        if a.eot_noise:
            out += f", noise std {_pixels(a.eot_noise)}"
    elif name == "surrogate_transfer":
        out = (f"transfer of {', '.join(a.sub_attacks(name))} from surrogates "
               + "+".join(f"{a.short_steps}-step defense" if s is Source.SHORTENED else s.value
                          for s in a.source_list(name)))
    elif name == "batch_mates":
        bound = "unconstrained" if a.batch_mates_eps is None else f"within Linf {_pixels(a.batch_mates_eps)}"
        out = (f"batch mates: {', '.join(map(str, a.batch_mates))} malicious inputs ({bound}) added to each batch, "
               "signed-gradient PGD through the adaptation on the benign inputs' cross-entropy")
    else:
        out = name
    if a.checkpoint and name in ("through_adaptation", "bpda_eot", "surrogate_transfer", "batch_mates"):
        out += " (checkpointed)"
    budget = []
    for key, word in (("n_iter", "iter"), ("n_restarts", "restarts"), ("n_target_classes", "targets"),
                      ("eot_iter", "EOT")):
        if point.get(key) is not None:
            budget.append(f"{point[key]} {word}")
    return out + (", " + ", ".join(budget) if budget else "")
