"""Dynamic defense by defensive entropy minimization (dent): test-time adaptation of the model and input."""

from dent.defenses.config import AffineMode, BNArithmetic, DentConfig, InputMode, SampleGrad, StatsMode
from dent.defenses.dent import Dent
from dent.defenses.differentiable import DifferentiableDent
from dent.defenses.objectives import OBJECTIVES
from dent.defenses.optim import OPTIMIZERS
from dent.defenses.presets import PRESETS

__all__ = [
    "Dent", "DifferentiableDent", "DentConfig", "AffineMode", "StatsMode", "InputMode", "SampleGrad", "BNArithmetic",
    "OBJECTIVES", "OPTIMIZERS", "PRESETS",
]
