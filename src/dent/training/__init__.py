"""Training: one loop (:mod:`.trainer`) shared by registered recipes (:mod:`.recipes`): nominal, PGD, TRADES,
FGSM-RS, ALP and DYNAT, with per-epoch checkpoints, bit-for-bit resume on CPU, a JSON log and curves.

This package's ``__init__`` stays light (the CLI imports :mod:`dent.training.config`); the rest is
imported on first use: ``from dent.training import train, export_reference_checkpoint``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainSection": "dent.training.config",
    "RECIPES": "dent.training.recipes",
    "Recipe": "dent.training.recipes",
    "StepContext": "dent.training.recipes",
    "StepOutput": "dent.training.recipes",
    "trades_loss": "dent.training.recipes",
    "pgd_examples": "dent.training.adversaries",
    "fgsm_rs_examples": "dent.training.adversaries",
    "trades_examples": "dent.training.adversaries",
    "Trainer": "dent.training.trainer",
    "TrainData": "dent.training.trainer",
    "TrainResult": "dent.training.trainer",
    "ResumeError": "dent.training.trainer",
    "TrainingError": "dent.training.trainer",
    "train": "dent.training.trainer",
    "prepare_data": "dent.training.trainer",
    "training_run_dir": "dent.training.trainer",
    "export_reference_checkpoint": "dent.training.export",
    "ExportError": "dent.training.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dent.training' has no attribute {name!r}")
