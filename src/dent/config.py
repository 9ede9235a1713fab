"""The root run config: every command reads one, from defaults <- ``--cfg`` YAML <- CLI overrides.

Sections are defined next to the code they configure; this module only composes them, validates once
and names the run directory.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

from pydantic import Field, field_validator

from dent.attacks.config import AttackSection
from dent.benchmark.config import BenchSection
from dent.confbase import Section, config_hash, deep_merge, parse_overrides, read_yaml, validated
from dent.defenses.config import DentConfig
from dent.evaluation.config import EvaluationSection
from dent.runtime import DEVICE_CHOICES
from dent.training.config import TrainSection


class ThreatModel(str, Enum):
    LINF = "Linf"
    L2 = "L2"


class ModelSection(Section):
    arch: str = "autoattack_resnet18"  # a name from `dent models`: an architecture or a named model
    threat_model: ThreatModel = ThreatModel.LINF  # selects RobustBench checkpoints (MODEL_DIR/cifar10/<Linf|L2>/)
    model_dir: Optional[Path] = None  # where named checkpoints live; default $DENT_MODEL_DIR or ./models
    checkpoint: Optional[Path] = None  # explicit checkpoint for an architecture name


class DataSection(Section):
    dataset: str = "cifar10"
    dir: Optional[Path] = None  # default: $DENT_DATA, ../shared/data, ./data
    split: str = "test"
    n_images: Annotated[int, Field(ge=1)] = 1000
    seed: int = 0  # seed of the class-stratified subset
    batch_size: Annotated[int, Field(ge=1)] = 128
    download: bool = False  # fetch from the official source (with checksum) when not found locally


class OutputSection(Section):
    root: Path = Path("runs")
    name: Optional[str] = None  # run directory name; default <command>-<config hash>


class RunConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    defenses: dict[str, DentConfig] = Field(
        default_factory=lambda: {"static": DentConfig(steps=0), "dent": DentConfig()}
    )
    attack: AttackSection = AttackSection()
    evaluation: EvaluationSection = EvaluationSection()
    output: OutputSection = OutputSection()
    train: TrainSection = TrainSection()  # dent train (dent.training)
    bench: BenchSection = BenchSection()  # dent bench (dent.benchmark)
    device: str = "auto"
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in DEVICE_CHOICES and not value.startswith("cuda:"):
            raise ValueError(f"expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")
        return value

    def hash(self) -> str:
        return config_hash(self.to_dict())

    def run_dir(self, command: str) -> Path:
        return self.output.root / (self.output.name or f"{command}-{self.hash()[:8]}")


#: Sections that a config file replaces as a whole instead of merging into the defaults (named lists).
REPLACED_WHOLE = {"defenses"}


def load_config(
    cfg_file: str | Path | None = None, overrides: Iterable[str] = (), file_defaults: dict[str, Any] | None = None
) -> RunConfig:
    """Resolve a run config: defaults, then the YAML file, then ``KEY VALUE`` / ``KEY=VALUE`` overrides.

    ``file_defaults`` stands in for the YAML file when none is given (a command's built-in job).
    """
    data = RunConfig().to_dict()
    file_data = read_yaml(cfg_file) if cfg_file is not None else dict(file_defaults or {})
    for key in REPLACED_WHOLE & file_data.keys():
        data[key] = {}
    data = deep_merge(deep_merge(data, file_data), parse_overrides(overrides))
    return validated(RunConfig, data)
