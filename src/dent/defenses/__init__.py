"""Dynamic defense by defensive entropy minimization (dent): test-time adaptation of the model and input;
and other defenses by kind (:mod:`dent.defenses.kinds`), with the traits attacks read (:mod:`dent.defenses.protocol`),
including detectors that may reject an input (:mod:`dent.defenses.detection`)."""

from dent.defenses.config import AffineMode, BNArithmetic, DentConfig, InputMode, SampleGrad, StatsMode
from dent.defenses.dent import Dent
from dent.defenses.detection import Rejecting, predictions_with_reject, rejects
from dent.defenses.differentiable import DifferentiableDent
from dent.defenses.kinds import DEFENSE_KINDS, build_defense
from dent.defenses.objectives import OBJECTIVES
from dent.defenses.optim import OPTIMIZERS
from dent.defenses.presets import PRESETS
from dent.defenses.protocol import Preprocessed, Traits, traits_of

__all__ = [
    "Dent", "DifferentiableDent", "DentConfig", "AffineMode", "StatsMode", "InputMode", "SampleGrad", "BNArithmetic",
    "OBJECTIVES", "OPTIMIZERS", "PRESETS", "DEFENSE_KINDS", "build_defense", "Preprocessed", "Traits", "traits_of",
    "Rejecting", "predictions_with_reject", "rejects",
]
