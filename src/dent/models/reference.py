"""The project's own trained checkpoints ("reference" models), stored in the repository.

Each model ``<name>`` is two files in ``src/dent/models/checkpoints/``: ``<name>.safetensors`` (weights in
fp16, loaded as float32; metadata records the architecture) and ``<name>.md``, its model card (how it was
trained, data, accuracy). Write the weights with :func:`save_reference` and register the model in this
module with :func:`register_reference`, e.g.::

    register_reference("resnet26_4_nominal", "resnet26_4", description="nominal training (pycls recipe)")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from dent.errors import CorruptFileError
from dent.models.architectures import ARCHITECTURES, build_model
from dent.models.checkpoints import CheckpointNotFoundError, read_safetensors_metadata, save_safetensors
from dent.models.zoo import ModelVariant, PretrainedModel, normalize_threat_model, register_pretrained
from dent.registry import Registry

#: Where the reference checkpoints and their model cards live (inside the package).
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
ARCH_KEY = "dent.arch"
ARCH_KWARGS_KEY = "dent.arch_kwargs"


@dataclass(frozen=True)
class ReferenceCheckpoint:
    name: str
    arch: str
    directory: Path = CHECKPOINT_DIR
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.safetensors"

    @property
    def card(self) -> Path:
        return self.directory / f"{self.name}.md"

    def how_to_obtain(self, model_dir: Path) -> str:
        return f"{self.path} (part of the dent repository; model card {self.card.name})"

    def is_available(self, model_dir: Path) -> bool:
        return self.path.is_file()

    def fetch(self, model_dir: Path, download: bool) -> Path:
        if not self.path.is_file():
            raise CheckpointNotFoundError(
                f"reference checkpoint {self.path} is missing: it is part of the dent repository "
                "(restore it with git, or reinstall dent from a checkout that has it)"
            )
        recorded = read_safetensors_metadata(self.path).get(ARCH_KEY)
        if recorded is not None and recorded.lower() != self.arch.lower():
            raise CorruptFileError(
                f"reference checkpoint {self.path} was saved for architecture {recorded!r}, "
                f"but {self.name} is registered as {self.arch!r}"
            )
        return self.path


def card_summary(card: Path) -> str:
    """The first paragraph line of a model card that is not a heading (for ``dent models``)."""
    if not card.is_file():
        return ""
    for line in card.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "---", "<!--")):
            return line[:120]
    return ""


def register_reference(
    name: str,
    arch: str,
    *,
    threat_model: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    description: str | None = None,
    num_classes: int = 10,
    directory: str | Path | None = None,
    registry: Registry | None = None,
) -> PretrainedModel:
    """Register ``<directory>/<name>.safetensors`` as a named model of architecture ``arch``.

    ``threat_model`` is ``None`` for nominal training, else the threat model of adversarial training.
    ``description`` defaults to the first line of the model card ``<name>.md``.
    """
    arch = ARCHITECTURES.canonical(arch)
    kwargs = dict(arch_kwargs or {})
    source = ReferenceCheckpoint(name, arch, Path(directory) if directory is not None else CHECKPOINT_DIR, kwargs)
    tm = None if threat_model is None else normalize_threat_model(threat_model)
    label = arch + (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    entry = PretrainedModel(
        name=name,
        kind="reference",
        num_classes=num_classes,
        description=description if description is not None else card_summary(source.card),
        variants={
            tm: ModelVariant(
                threat_model=tm,
                factory=lambda: build_model(arch, num_classes=num_classes, **kwargs),
                arch=label,
                source=source,
            )
        },
    )
    return register_pretrained(entry, registry)


def save_reference(
    model: nn.Module,
    name: str,
    arch: str,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    directory: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s weights as ``<directory>/<name>.safetensors`` in fp16, recording the architecture.

    Write the model card ``<name>.md`` next to it by hand.
    """
    meta = {ARCH_KEY: ARCHITECTURES.canonical(arch), ARCH_KWARGS_KEY: json.dumps(dict(arch_kwargs or {}))}
    meta.update({k: v for k, v in (metadata or {}).items()})
    directory = Path(directory) if directory is not None else CHECKPOINT_DIR
    return save_safetensors(model.state_dict(), directory / f"{name}.safetensors", meta)


# The project's reference models (trained on this project's CPU machine; see each model card).
register_reference("resnet26_1_nominal", "resnet26_1")
register_reference("resnet26_1_pgd", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_distilled", "resnet26_1")
register_reference("resnet26_1_gradpen", "resnet26_1")
# The static-defense comparison (issue #16; cfgs/train/cpu_*_resnet26_1.yaml, 3 epochs each).
register_reference("resnet26_1_pgd_at", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_trades", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_dynat", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_fgsm_rs", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_alp", "resnet26_1", threat_model="Linf")
register_reference("resnet26_1_dynat_inner", "resnet26_1", threat_model="Linf")
