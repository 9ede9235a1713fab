"""dent: dynamic adversarial defense by defensive entropy minimization, and its honest evaluation.

The Python API in a few lines::

    import dent
    model = dent.load_model("autoattack_resnet18")          # inputs in [0, 1]
    defended = dent.Dent(model, dent.DentConfig(steps=10))  # adapts per batch, predicts, resets
    logits = defended(x)

Layers, with dependencies pointing one way: ``data`` and ``models`` -> ``defenses`` -> ``attacks`` ->
``evaluation`` / ``training`` / ``benchmark`` / ``serving`` -> ``cli``.
"""

from dent.data import Split, load_split, load_subset
from dent.defenses import AffineMode, Dent, DentConfig, InputMode, StatsMode
from dent.distribution import warn_if_conflicting_installation
from dent.models import build_model, list_models, load_model

warn_if_conflicting_installation()


def benchmark_defenses(model, **kwargs):
    """Evaluate defenses around ``model`` under attacks and return their table (RobustBench's ``benchmark``):
    see :func:`dent.evaluation.api.benchmark_defenses` (imported on first use: it loads the attack libraries).
    (``dent.benchmark`` is the package of ``dent bench``, the timings.)"""
    from dent.evaluation.api import benchmark_defenses as run

    return run(model, **kwargs)

__version__ = "0.1.0"

__all__ = [
    "AffineMode",
    "Dent",
    "DentConfig",
    "InputMode",
    "Split",
    "StatsMode",
    "benchmark_defenses",
    "build_model",
    "list_models",
    "load_model",
    "load_split",
    "load_subset",
]
