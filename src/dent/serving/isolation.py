"""Which defenses each isolation policy admits, and what it tells every answer.

``sample`` promises that an answer depends on its own input only, so it admits only defenses that compute
each input alone: static modules and transforms, and :class:`~dent.defenses.Dent` with a sample-wise config
(:meth:`~dent.defenses.config.DentConfig.batch_couplings` empty: per-input affine values on fixed statistics,
a per-input objective, steps independent of the batch size), without state carried between calls.
``client`` forms every batch from one request, so it admits batch-wise adaptation but no state carried
between calls (that would carry one client's inputs into another's answers). ``shared`` admits anything.
"""

from __future__ import annotations

from torch import nn

from dent.defenses import Dent, traits_of
from dent.errors import ConfigError
from dent.serving.config import Isolation

#: What each policy guarantees, as every answer's metadata states it.
GUARANTEES = {
    Isolation.SAMPLE: "each answer depends on its own image only: the defense adapts per input (or not at all), "
                      "so batch-mates from other requests do not change it",
    Isolation.CLIENT: "each batch holds this request's images only: the defense adapts over them together, "
                      "never over other requests' images",
    Isolation.SHARED: "batches mix requests from different clients and the defense adapts over the whole batch: "
                      "other clients' images change this answer",
}

#: The warning of isolation ``shared``, at start and in every answer.
SHARED_WARNING = ("isolation 'shared': answers depend on other clients' images in the same batch (batch-wise "
                  "adaptation over strangers' inputs), so a client can influence, and learn about, others' answers")


def batch_couplings(defense: nn.Module) -> list[str]:
    """Why one input's answer depends on the other inputs of its call; empty for a sample-wise defense.

    Each :class:`Dent` inside is judged by its config; any other module that declares itself adaptive
    (without a Dent inside to explain it) or randomized is not known to be sample-wise.
    """
    reasons = []
    for name, module in defense.named_modules():
        where = f"{type(module).__name__} {name!r}" if name else type(module).__name__
        if isinstance(module, Dent):
            reasons += [f"{where}: {reason}" for reason in module.config.batch_couplings()]
        elif traits_of(module).adaptive and not any(isinstance(m, Dent) for m in module.modules()):
            reasons.append(f"{where} declares itself adaptive (it adapts to its batch)")
    if traits_of(defense).randomized:
        reasons.append(f"{type(defense).__name__} is randomized: its draws are taken per call, shared by the batch")
    return reasons


def carried_state(defense: nn.Module) -> list[str]:
    """The modules inside ``defense`` whose calls start from the state the previous call left."""
    return [f"{type(m).__name__} {name!r}" if name else type(m).__name__
            for name, m in defense.named_modules() if isinstance(m, Dent) and m.config.carries_state]


def check_isolation(defense: nn.Module, isolation: Isolation) -> None:
    """Refuse, with the reasons, a defense that ``isolation`` cannot keep its promise with."""
    carried = carried_state(defense)
    if carried and isolation is not Isolation.SHARED:
        raise ConfigError(
            f"isolation {isolation.value!r}: {', '.join(carried)} is not episodic (episodic false), so every call "
            "starts from the state earlier requests left; set the defense's episodic true"
        )
    if isolation is Isolation.SAMPLE:
        reasons = batch_couplings(defense)
        if reasons:
            raise ConfigError(
                "isolation 'sample' needs a sample-wise defense, but this one is batch-wise:\n  "
                + "\n  ".join(reasons)
                + "\nmake it sample-wise (e.g. {preset: dent_plus_bsi, diversity_weight: 0}), or serve it under "
                  "isolation 'client' (one request per batch)"
            )


def metadata(isolation: Isolation) -> dict[str, str]:
    """The isolation part of every answer's metadata."""
    meta = {"isolation": isolation.value, "guarantee": GUARANTEES[isolation]}
    if isolation is Isolation.SHARED:
        meta["warning"] = SHARED_WARNING
    return meta
