"""The defense registry: ``defenses:`` entries by kind, each with its own typed config section.

An entry names its kind (``kind: jpeg``, ``quality: 50``); an entry without ``kind`` (or ``kind: dent``)
is a :class:`~dent.defenses.config.DentConfig`, serialized exactly as before kinds existed, so every
earlier config, run hash and unit key is unchanged. ``kind: pipeline`` composes kinds in input order
(``stages: [jpeg, dent]``: JPEG, then dent adapting on the JPEG'd batch); ``kind: pkg.module:Class``
names a user's ``nn.Module`` defense, built as ``Class(model, **params)`` with its traits as class
attributes (:mod:`dent.defenses.protocol`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BeforeValidator, Field, SerializeAsAny, field_validator, model_validator
from torch import nn

from dent.confbase import Section
from dent.defenses.config import DentConfig
from dent.defenses.detection import FeatureSqueezing, Rejecting
from dent.defenses.detection.stored import detector_path, load_detector
from dent.defenses.protocol import Preprocessed
from dent.defenses.purification import PixelDefend, density_model_path, load_density_model
from dent.defenses.sap import SAP
from dent.defenses.transforms import JPEG, BitDepth, MedianSmoothing, RandomResizePad, TotalVariationMin
from dent.errors import ConfigError
from dent.registry import Registry
from dent.threat import PixelFloat

Builder = Callable[[nn.Module, Any], nn.Module]


@dataclass(frozen=True)
class Kind:
    """A defense kind: its config section and how to build it around a model (``build(model, config)``)."""

    config: type[Section]
    build: Builder


DEFENSE_KINDS: Registry[Kind] = Registry("defense kind")


def kind_name(config: Section) -> str:
    """The kind of a defense config (``dent`` for a DentConfig, which has no ``kind`` key)."""
    return "dent" if isinstance(config, DentConfig) else config.kind


def parse_defense(value: Any) -> Any:
    """A ``defenses:`` entry (mapping, kind name or section) -> its kind's config section.

    An unknown kind is a ``ValueError`` listing the valid ones; a bad key of a known kind is reported with
    its dotted key (``defenses.NAME.quality``) and the expected range.
    """
    if isinstance(value, Section):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueError(f"expected a defense: a mapping of its keys or a kind name, got {value!r}")
    kind = str(value.get("kind", "dent"))
    if ":" in kind:
        cls: type[Section] = ImportedConfig
    elif kind in DEFENSE_KINDS:
        cls = DEFENSE_KINDS.get(kind).config
        rest = {k: v for k, v in value.items() if k != "kind"}
        value = {**rest, "kind": DEFENSE_KINDS.canonical(kind)} if "kind" in cls.model_fields else rest
    else:
        raise ValueError(DEFENSE_KINDS.unknown_message(kind) + ", or a class as 'package.module:Class'")
    return cls.model_validate(value)  # its errors carry their keys below the entry's


#: A ``defenses:`` entry as a config field: parsed by kind, serialized as its own section.
DefenseSpec = Annotated[SerializeAsAny[Section], BeforeValidator(parse_defense)]


def build_defense(model: nn.Module, config: Section) -> nn.Module:
    """The defense of ``config`` around ``model``."""
    if isinstance(config, ImportedConfig):
        return config.build(model)
    return DEFENSE_KINDS.get(kind_name(config)).build(model, config)


def register_kind(name: str, config: type[Section], build: Builder) -> None:
    DEFENSE_KINDS.register(name, Kind(config, build))


def _transform_kind(name: str, config: type[Section], make: Callable[[Any], nn.Module]) -> None:
    """Register a kind whose defense is the transform ``make(config)`` before the model."""
    register_kind(name, config, lambda model, cfg: Preprocessed(make(cfg), model))


# -- built-in kinds --------------------------------------------------------------------------------


class JPEGConfig(Section):
    kind: Literal["jpeg"] = "jpeg"
    quality: Annotated[int, Field(ge=1, le=95)] = 75  # PIL's useful range (above 95 disables parts of the codec)


class BitDepthConfig(Section):
    kind: Literal["bit_depth"] = "bit_depth"
    bits: Annotated[int, Field(ge=1, le=8)] = 4  # levels: 2**bits


class MedianConfig(Section):
    kind: Literal["median"] = "median"
    size: Annotated[int, Field(ge=1, le=15)] = 2  # window side in pixels (Xu et al.: 2 on CIFAR-10)


class TVMConfig(Section):
    kind: Literal["tvm"] = "tvm"
    keep: Annotated[float, Field(gt=0, le=1)] = 0.5  # probability that a pixel is kept as a constraint
    weight: Annotated[float, Field(gt=0)] = 0.03  # weight of the total variation
    iterations: Annotated[int, Field(ge=1, le=1000)] = 30  # projected gradient steps of the solver
    lr: Annotated[float, Field(gt=0)] = 0.1  # the solver's step size


class ResizePadConfig(Section):
    kind: Literal["resize_pad"] = "resize_pad"
    min_scale: Annotated[float, Field(gt=0, le=1)] = 0.8  # smallest side, as a fraction of the input's


class SAPConfig(Section):
    kind: Literal["sap"] = "sap"
    fraction: Annotated[float, Field(gt=0)] = 1.0  # draws per activation map, as a fraction of its size


class FeatureSqueezingConfig(Section):
    """Feature squeezing as a detector (Xu et al. 2018): K + 1 logits, the last one "rejected as adversarial"."""

    kind: Literal["feature_squeezing"] = "feature_squeezing"
    bits: Annotated[int, Field(ge=1, le=8)] = 5  # the bit-depth squeezer (Xu et al.: 5 on CIFAR-10)
    median_size: Annotated[int, Field(ge=1, le=15)] = 2  # the median squeezer's window side (Xu et al.: 2)
    fpr: Annotated[float, Field(ge=0, lt=1)] = 0.05  # the clean false-positive rate the threshold is set at
    # the threshold calibrated at `fpr` (FeatureSqueezing.calibrate); null: not calibrated, so it cannot be built
    threshold: Optional[Annotated[float, Field(allow_inf_nan=False)]] = None


class DetectorConfig(Section):
    """A trained detector (``dent train``, recipes kde_detector and subnetwork_detector): K + 1 logits, the last
    one "rejected as adversarial"; it must be the detector of the model evaluated (same weights digest)."""

    kind: Literal["detector"] = "detector"
    # a stored detector's name (dent.defenses.detection.stored) or the path of a detector .safetensors file
    checkpoint: Optional[str] = None
    # the file's digest, filled in when the run is resolved: results are keyed by the detector actually used
    digest: Optional[str] = None

    @field_validator("checkpoint")
    @classmethod
    def _stored(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            detector_path(value)  # an unknown name or missing file is a config error, listing the stored ones
        return value

    def resolved(self) -> "DetectorConfig":
        """With ``digest`` set to the checkpoint file's (a stale one given in the config is refused)."""
        return with_file_digest(self, detector_path(_trained_checkpoint(self)), f"detector {self.checkpoint!r}")


def with_file_digest(config: Section, path: Path, what: str) -> Section:
    """``config`` with its ``digest`` key set to the digest of the trained file ``path`` it names, so that results
    are keyed by the file actually used; a different digest given in the config is refused."""
    from dent.identity import file_digest

    digest = file_digest(path)
    if config.digest is not None and config.digest != digest:
        raise ConfigError(f"{what}: config key 'digest' is {config.digest}, but the file's digest is {digest} "
                          "(retrained?); drop 'digest' to use the file")
    return config.model_copy(update={"digest": digest})


def _trained_checkpoint(config: DetectorConfig) -> str:
    if config.checkpoint is None:
        raise ConfigError(
            "detector: config key 'checkpoint' is null, so there is no trained detector to use: train one with "
            "`dent train --cfg cfgs/train/detector_kde_resnet18.yaml --export NAME` (docs/training.md) and set "
            "'checkpoint' to NAME"
        )
    return config.checkpoint


class PixelDefendConfig(Section):
    """PixelDefend (Song et al. 2018): each pixel set to its most likely value under a trained PixelCNN within
    ``eps_defend`` of the input's, before the model (dent.defenses.purification)."""

    kind: Literal["pixeldefend"] = "pixeldefend"
    # a stored density model's name (dent.defenses.purification.stored) or the path of its .safetensors file
    density_model: str = "pixelcnn_cifar10"
    eps_defend: Annotated[PixelFloat, Field(ge=0, le=1)] = 16 / 255  # Song et al.: 16/255 against an 8/255 attacker
    # the file's digest, filled in when the run is resolved: results are keyed by the density model actually used
    digest: Optional[str] = None

    @field_validator("density_model")
    @classmethod
    def _stored(cls, value: str) -> str:
        density_model_path(value)  # an unknown name or missing file is a config error, listing the stored ones
        return value

    def resolved(self) -> "PixelDefendConfig":
        return with_file_digest(self, density_model_path(self.density_model), f"density model {self.density_model!r}")


class PipelineConfig(Section):
    """Kinds composed in input order: the first stage sees the input, the last one wraps the model."""

    kind: Literal["pipeline"] = "pipeline"
    stages: list[DefenseSpec]

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("at least one stage is needed, e.g. [jpeg, dent]")
        return value


class ImportedConfig(Section):
    """A user's defense class ``package.module:Class``, built as ``Class(model, **params)``."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _importable_with_params(self) -> "ImportedConfig":
        cls = import_defense(self.kind)
        try:
            inspect.signature(cls).bind(None, **self.params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} cannot be built as {cls.__name__}(model, **params) with params "
                             f"{self.params}: {exc}") from None
        return self

    def build(self, model: nn.Module) -> nn.Module:
        return import_defense(self.kind)(model, **self.params)


def resolved_defense(config: Section, device: Any) -> Section:
    """``config`` with what depends on the device fixed for ``device`` (dent's ``autocast: auto``), in every stage
    of a pipeline too, so that a unit's key records what actually runs there."""
    if isinstance(config, DentConfig):
        return config.resolved(device)
    if isinstance(config, PipelineConfig):
        return config.model_copy(update={"stages": [resolved_defense(stage, device) for stage in config.stages]})
    if isinstance(config, (DetectorConfig, PixelDefendConfig)):
        return config.resolved()
    return config


def import_defense(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named ``package.module:Class``; ValueError saying what is wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected a defense class as 'package.module:Class', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of defense {path!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path!r} is not an nn.Module class (module {module_name!r} has no such class)")
    return cls


def _build_dent(model: nn.Module, config: DentConfig) -> nn.Module:
    from dent.defenses.dent import Dent  # deferred: dent.py imports the whole adaptation machinery

    return Dent(model, config)


def _build_feature_squeezing(model: nn.Module, config: FeatureSqueezingConfig) -> nn.Module:
    detector = FeatureSqueezing.standard(model, config.bits, config.median_size)
    if config.threshold is None:
        raise ConfigError(
            f"feature_squeezing: config key 'threshold' is null, the detector is not calibrated; calibrate it on "
            f"clean images, FeatureSqueezing.standard(model, {config.bits}, {config.median_size}).calibrate(images, "
            f"fpr={config.fpr}), and set 'threshold' to the value it returns"
        )
    detector.threshold.fill_(config.threshold)
    return Rejecting(model, detector)


def _build_detector(model: nn.Module, config: DetectorConfig) -> nn.Module:
    return Rejecting(model, load_detector(model, _trained_checkpoint(config)))


def _build_pipeline(model: nn.Module, config: PipelineConfig) -> nn.Module:
    for stage in reversed(config.stages):
        model = build_defense(model, stage)
    return model


register_kind("dent", DentConfig, _build_dent)
_transform_kind("jpeg", JPEGConfig, lambda c: JPEG(c.quality))
_transform_kind("bit_depth", BitDepthConfig, lambda c: BitDepth(c.bits))
_transform_kind("median", MedianConfig, lambda c: MedianSmoothing(c.size))
_transform_kind("tvm", TVMConfig, lambda c: TotalVariationMin(c.keep, c.weight, c.iterations, c.lr))
_transform_kind("resize_pad", ResizePadConfig, lambda c: RandomResizePad(c.min_scale))
register_kind("sap", SAPConfig, lambda model, c: SAP(model, c.fraction))
register_kind("feature_squeezing", FeatureSqueezingConfig, _build_feature_squeezing)
register_kind("detector", DetectorConfig, _build_detector)
_transform_kind("pixeldefend", PixelDefendConfig,
                lambda c: PixelDefend(load_density_model(c.density_model), c.eps_defend))
register_kind("pipeline", PipelineConfig, _build_pipeline)
