"""Named pretrained models: the ``PRETRAINED`` registry, ``load_model`` and ``list_models``.

An entry (:class:`PretrainedModel`) has a name, a kind -- ``"shipped"`` (weights inside an installed
package), ``"robustbench"`` (a RobustBench checkpoint under ``MODEL_DIR``, downloaded when missing) or
``"reference"`` (the project's own checkpoints in ``dent/models/checkpoints``) -- and one
:class:`ModelVariant` per threat model it was trained for (``None`` for nominal training). A variant holds
the architecture factory and a :class:`WeightsSource` that says where the weights are and how to get them.
The sources are defined in :mod:`dent.models.shipped`, :mod:`dent.models.robustbench` and
:mod:`dent.models.reference`, which register their entries here.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from torch import nn

from dent.errors import ConfigError, DentError, UnknownNameError
from dent.models.architectures import ARCHITECTURES, build_model, describe_architecture
from dent.models.checkpoints import CheckpointNotFoundError, load_checkpoint
from dent.registry import Registry
from dent.threat import ThreatModel

KINDS = ("shipped", "robustbench", "reference")


def resolve_model_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """``model_dir`` if given, else ``$DENT_MODEL_DIR``, else ``./models``."""
    if model_dir is not None:
        return Path(model_dir).expanduser()
    env = os.environ.get("DENT_MODEL_DIR")
    return Path(env).expanduser() if env else Path("models")


def normalize_threat_model(threat_model: object) -> str:
    """The name (``Linf`` / ``L2``, the keys of :attr:`PretrainedModel.variants`) of a threat model given as a
    :class:`~dent.threat.ThreatModel` or a string in any case."""
    try:
        return ThreatModel.parse(threat_model).value
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class WeightsSource(Protocol):
    """Where the weights of a model variant are, and how to get them."""

    def how_to_obtain(self, model_dir: Path) -> str:
        """One line for humans: where the file goes / comes from."""

    def is_available(self, model_dir: Path) -> bool:
        """Whether the weights can be loaded without the network."""

    def fetch(self, model_dir: Path, download: bool) -> Path:
        """The local weights file, obtaining it if needed; raises a DentError saying what to do if impossible."""


@dataclass(frozen=True)
class ModelVariant:
    threat_model: Optional[str]  # None: nominal (not adversarially trained)
    factory: Callable[[], nn.Module]  # builds the architecture with the right options (random weights)
    arch: str  # human-readable architecture, e.g. "WRN-28-10"
    source: WeightsSource
    description: str = ""


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    kind: str
    variants: dict = field(default_factory=dict)  # threat model (or None) -> ModelVariant
    description: str = ""
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def variant(self, threat_model: object = "Linf") -> ModelVariant:
        """The variant for ``threat_model``; nominal models (a single ``None`` variant) ignore it."""
        if None in self.variants and len(self.variants) == 1:
            return self.variants[None]
        tm = normalize_threat_model(threat_model)
        if tm not in self.variants:
            have = ", ".join(str(t) for t in self.variants)
            raise ConfigError(
                f"{self.name} has no {tm} model; it exists for threat model(s) {have} "
                f"(set model.threat_model, e.g. model.threat_model={next(iter(self.variants))})"
            )
        return self.variants[tm]


PRETRAINED: Registry[PretrainedModel] = Registry("model")


def register_pretrained(entry: PretrainedModel, registry: Registry | None = None) -> PretrainedModel:
    (PRETRAINED if registry is None else registry).register(entry.name, entry)
    return entry


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``dent models``."""

    name: str
    kind: str  # "architecture" | "shipped" | "robustbench" | "reference"
    threat_model: Optional[str]
    offline_available: bool
    description: str
    weights: str = ""  # where the weights are / how to obtain them


def list_models(model_dir: str | os.PathLike | None = None) -> list[ModelInfo]:
    """Named models (one row per threat model) then architectures. Architectures need no download, so
    they count as available offline (loading one needs ``checkpoint=``)."""
    root = resolve_model_dir(model_dir)
    rows = []
    for name, entry in PRETRAINED.items():
        for tm, variant in entry.variants.items():
            desc = variant.description or entry.description
            rows.append(ModelInfo(
                name, entry.kind, tm, bool(variant.source.is_available(root)), f"{variant.arch}: {desc}",
                weights=variant.source.how_to_obtain(root),
            ))
    for name, factory in ARCHITECTURES.items():
        rows.append(ModelInfo(
            name, "architecture", None, True, describe_architecture(factory) + " [needs checkpoint=]",
            weights="none: pass checkpoint=PATH",
        ))
    return rows


def _check_checkpoint_path(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    return path


#: The data sets the zoo's models are trained on (RobustBench's ``dataset=`` argument).
ZOO_DATASETS = ("cifar10",)


def architecture_without_weights(name: str, threat_model: object, model_dir: str | os.PathLike | None = None
                                 ) -> Optional[nn.Module]:
    """A named model's architecture with random weights (eval mode, CPU) when its weights are not on this machine;
    None when they are (or ``name`` is not a named model). What costs are timed on: weights do not change them."""
    if name not in PRETRAINED:
        return None
    variant = PRETRAINED.get(name).variant(threat_model)
    if variant.source.is_available(resolve_model_dir(model_dir)):
        return None
    return variant.factory().cpu().eval()


def load_model(
    name: str,
    *,
    dataset: str = "cifar10",
    threat_model: object = "Linf",
    model_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int = 10,
    download: bool = True,
) -> nn.Module:
    """A model with weights, in eval mode on CPU, taking images in [0, 1].

    ``name`` is a named model (see ``dent models``; ``threat_model`` picks the RobustBench variant and
    ``checkpoint`` optionally replaces its weights file) or an architecture name together with
    ``checkpoint=PATH`` (a ``.pt``/``.pth`` state dict or ``.safetensors`` file). ``dataset`` and
    ``threat_model`` are spelled as in RobustBench's ``load_model``; the zoo has CIFAR-10 models only.
    """
    if str(dataset).lower() not in ZOO_DATASETS:
        raise ConfigError(f"dataset={dataset!r}: dent's model zoo has models for {', '.join(ZOO_DATASETS)} only")
    if name in PRETRAINED:
        entry = PRETRAINED.get(name)
        if num_classes != entry.num_classes:
            raise ConfigError(f"{entry.name} has {entry.num_classes} classes, not {num_classes}")
        variant = entry.variant(threat_model)
        root = resolve_model_dir(model_dir)
        path = _check_checkpoint_path(checkpoint) if checkpoint is not None else variant.source.fetch(root, download)
        label = f"{entry.name} ({variant.arch})"
        model = load_checkpoint(variant.factory(), path, label)
    elif name in ARCHITECTURES:
        arch = ARCHITECTURES.canonical(name)
        if checkpoint is None:
            raise DentError(
                f"{arch!r} is an architecture, which has no weights of its own: pass a checkpoint "
                f"(load_model({arch!r}, checkpoint=PATH), or model.checkpoint=PATH on the command line), "
                f"or use a named model: {', '.join(PRETRAINED.names())}"
            )
        model = load_checkpoint(build_model(arch, num_classes=num_classes), _check_checkpoint_path(checkpoint), arch)
    else:
        valid = PRETRAINED.names() + ARCHITECTURES.names()
        close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(
            f"unknown model {name!r}{hint}; named models: {', '.join(PRETRAINED.names())}; "
            f"architectures (with checkpoint=PATH): {', '.join(ARCHITECTURES.names())}"
        )
    return model.cpu().eval()
