"""The teacher of defensive distillation: a named model of the zoo or a finished ``dent train`` run."""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Callable

from torch import nn

from dent.errors import ConfigError

log = logging.getLogger(__name__)


def load_teacher(spec: str, *, temperature: float, build: Callable[[str], nn.Module]) -> nn.Module:
    """The model ``train.distillation.teacher`` names, in eval mode with frozen parameters.

    ``spec`` is a ``dent train`` run directory (or its checkpoint file) of a finished run, or a named model
    (``dent models``). A run trained with another recipe than ``temperature`` at ``temperature`` is accepted
    (that is Hinton et al.'s distillation, not Papernot et al.'s defense) with a warning in the log. ``build``
    makes the run's architecture (the trainer's model builder).
    """
    from dent.models import PRETRAINED, load_model

    path = Path(spec).expanduser()
    if path.exists():
        model = _from_run(path, temperature, build)
    elif spec in PRETRAINED:
        model = load_model(spec, download=False)
    else:
        raise ConfigError(
            f"train.distillation.teacher {spec!r} is neither a dent train run directory (or its checkpoint file) "
            f"nor a named model; named models: {', '.join(PRETRAINED.names())}"
        )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _from_run(path: Path, temperature: float, build: Callable[[str], nn.Module]) -> nn.Module:
    from dent.training.trainer import CHECKPOINT_FILE, load_checkpoint

    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"train.distillation.teacher {str(path)!r} holds no {CHECKPOINT_FILE}: expected the run "
                          "directory of a finished `dent train` run (the teacher, recipe temperature)")
    ckpt = load_checkpoint(file)
    if ckpt["status"] == "running":
        raise ConfigError(f"train.distillation.teacher {str(path)!r} stopped at epoch {ckpt['epoch']} of "
                          f"{ckpt['epochs']}: finish it with `dent train ... --resume` first")
    from dent.training.config import DistillationSection

    taught = {**DistillationSection().to_dict(), **ckpt["config"]["train"].get("distillation", {})}
    if ckpt["recipe"] != "temperature" or taught["temperature"] != temperature:
        log.warning("the teacher %s was trained with recipe %s, not recipe temperature at T = %g: the student "
                    "distills it, but this is not defensive distillation as Papernot et al. define it",
                    path, ckpt["recipe"], temperature)
    model = build(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model
