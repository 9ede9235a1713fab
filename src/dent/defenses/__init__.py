"""Dynamic defense by defensive entropy minimization (dent): test-time adaptation of the model and input."""

from dent.defenses.config import AffineMode, DentConfig, InputMode, StatsMode
from dent.defenses.dent import Dent
from dent.defenses.differentiable import DifferentiableDent
from dent.defenses.objectives import OBJECTIVES
from dent.defenses.optim import OPTIMIZERS

__all__ = ["Dent", "DifferentiableDent", "DentConfig", "AffineMode", "StatsMode", "InputMode", "OBJECTIVES", "OPTIMIZERS"]
