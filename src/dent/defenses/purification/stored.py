"""Trained density models on disk, like the reference classifiers: ``<name>.safetensors`` (fp16 weights, the
density model's registry name in the metadata) and its card ``<name>.md``. ``dent train`` writes them
(recipe ``pixelcnn``, ``--export NAME`` into :data:`PURIFIER_DIR`); the defense kind ``pixeldefend`` loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from dent.defenses.purification.pixelcnn import DENSITY_MODELS
from dent.errors import CorruptFileError

#: Where the project's trained density models and their cards live (inside the package).
PURIFIER_DIR = Path(__file__).resolve().parent / "checkpoints"
ARCH_KEY = "dent.density_model"


def density_model_path(checkpoint: str, directory: Path = PURIFIER_DIR) -> Path:
    """The file of a stored density model's name, or ``checkpoint`` itself as a path to a ``.safetensors`` file."""
    from dent.models.checkpoints import stored_file

    return stored_file(checkpoint, directory, "density model", "train one with `dent train --cfg "
                       "cfgs/train/pixelcnn_cifar10.yaml --export NAME` (docs/training.md)")


def save_density_model(model: nn.Module, arch: str, path: Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (built as ``DENSITY_MODELS[arch]()``) to ``path`` in fp16."""
    from dent.models.checkpoints import save_safetensors

    return save_safetensors(model.state_dict(), path, {ARCH_KEY: DENSITY_MODELS.canonical(arch), **(metadata or {})})


def load_density_model(checkpoint: str, directory: Path = PURIFIER_DIR) -> nn.Module:
    """The stored density model ``checkpoint`` (a name or a path), in float32 and eval mode."""
    from dent.models.checkpoints import read_safetensors_metadata, read_state_dict

    path = density_model_path(checkpoint, directory)
    arch = read_safetensors_metadata(path).get(ARCH_KEY)
    if arch not in DENSITY_MODELS:
        raise CorruptFileError(f"{path} is not a dent density model file: its metadata key {ARCH_KEY} is {arch!r}, "
                               f"expected one of {', '.join(DENSITY_MODELS.names())} (written by `dent train --export`)")
    model = DENSITY_MODELS.get(arch)()
    try:
        model.load_state_dict({k: v.float() for k, v in read_state_dict(path).items()})
    except RuntimeError as exc:
        raise CorruptFileError(f"{path}: its tensors do not fit the density model {arch!r}: {exc}") from None
    return model.eval()
