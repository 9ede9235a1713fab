"""The official dent implementation (DequanWang/dent's ``dent.py``), imported from a path the user gives, timed
by ``dent bench`` beside :class:`~dent.defenses.Dent` on the same model, batch and K (``bench.official``).

The file is never copied into this project: it is imported at run time from where the user keeps it. It
needs the ``adamod`` package (``pip install --no-deps adamod==0.0.3``). Its ``convert_batchnorm`` replaces the
model's BatchNorms in place, so it gets its own deep copy of the model.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

from torch import nn

from dent.defenses.config import AffineMode, DentConfig, InputMode, StatsMode
from dent.errors import ConfigError

#: DentConfig's names -> the official code's (its setup_optimizer METHOD, its loss functions).
METHODS = {"adamod_official": "AdaMod", "adamod": "AdaMod", "adam": "Adam", "sgd": "SGD"}
LOSSES = {"shot": "shot", "entropy": "tent"}


def load_official(path: str | Path) -> ModuleType:
    """The official ``dent.py`` at ``path`` (the file, or the repository directory holding it), imported."""
    given = Path(path).expanduser()
    file = given / "dent.py" if given.is_dir() else given
    if not file.is_file():
        raise ConfigError(f"bench.official: {str(given)!r} is neither the official dent.py nor a directory "
                          "holding one (a clone of https://github.com/DequanWang/dent)")
    spec = importlib.util.spec_from_file_location("dent_official", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        hint = " (pip install --no-deps adamod==0.0.3)" if exc.name == "adamod" else ""
        raise ConfigError(f"bench.official: {file} imports {exc.name!r}, which is not installed{hint}") from None
    missing = [name for name in ("Dent", "SampleAwareStaticBatchNorm2d", "SampleAwareOnlineBatchNorm2d")
               if not hasattr(module, name)]
    if missing:
        raise ConfigError(f"bench.official: {file} has no {', '.join(missing)}: not the official dent.py")
    return module


def official_settings(config: DentConfig) -> SimpleNamespace:
    """The official code's ``opt_cfg`` for ``config``, which must be something that code computes."""
    problems = []
    if config.affine is not AffineMode.SAMPLE:
        problems.append(f"affine={config.affine.value!r} (it adapts per-input scales and shifts: 'sample')")
    if config.input is not InputMode.NONE:
        problems.append(f"input={config.input.value!r} (it has no input blur: 'none')")
    if config.objective not in LOSSES:
        problems.append(f"objective={config.objective!r} (it has {', '.join(LOSSES)})")
    if config.optimizer not in METHODS:
        problems.append(f"optimizer={config.optimizer!r} (it has {', '.join(METHODS)})")
    if config.betas[1] != 0.999:
        problems.append(f"betas[1]={config.betas[1]} (it fixes 0.999)")
    if problems:
        raise ConfigError("bench.official_mode: the official dent.py cannot compute this defense: " + "; ".join(problems))
    stats = "Static" if config.stats is StatsMode.FIXED else "Online"
    return SimpleNamespace(
        BN_FUN=f"SampleAware{stats}BatchNorm2d", STEPS=config.steps, LOSS=LOSSES[config.objective],
        METHOD=METHODS[config.optimizer], LR=config.lr, BETA=config.betas[0], BETA3=config.beta3,
        WD=config.weight_decay, MOMENTUM=config.momentum, DAMPENING=0.0, NESTEROV=False,
    )


def official_defense(module: ModuleType, model: nn.Module, config: DentConfig) -> nn.Module:
    """The official ``Dent`` around a copy of ``model``, set up as ``config``."""
    return module.Dent(copy.deepcopy(model), official_settings(config))
