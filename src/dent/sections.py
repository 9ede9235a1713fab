"""What every command's config shares: the model, the data, where outputs go, and the loading of a config.

Each command has its own config class, next to the code it configures (``dent.evaluation.config.EvaluateConfig``,
``dent.training.config.TrainConfig``, ``dent.benchmark.config.BenchConfig``; :class:`ModelDataConfig` here for
``dent accuracy`` and ``dent models``), composed of these sections and its own. A config is resolved from
defaults <- ``--cfg`` YAML <- ``KEY VALUE`` overrides and validated once; its result tree
(:mod:`dent.identity`) names its default run directory ``<command>-<result hash[:8]>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Optional, TypeVar

from pydantic import AfterValidator, Field

from dent.confbase import NON_RESULT, Section, deep_merge, override_pairs, parse_overrides, read_yaml, validated
from dent.errors import ConfigError
from dent.identity import flat_hash, flatten, result_tree
from dent.runtime import DEVICE_CHOICES
from dent.threat import ThreatModel
from dent.tracking import Tracking


def known_device(value: str) -> str:
    if value not in DEVICE_CHOICES and not value.startswith("cuda:"):
        raise ValueError(f"expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    return value


#: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`dent.runtime.resolve_device`).
DeviceName = Annotated[str, AfterValidator(known_device)]


class ArchSection(Section):
    arch: str = "autoattack_resnet18"  # a name from `dent models`: an architecture or a named model


class ModelSection(ArchSection):
    """A model with weights: a named model, or an architecture and a checkpoint."""

    threat_model: ThreatModel = ThreatModel.LINF  # selects RobustBench checkpoints (MODEL_DIR/cifar10/<Linf|L2>/)
    # where named checkpoints live; default $DENT_MODEL_DIR or ./models
    model_dir: Annotated[Optional[Path], NON_RESULT] = None
    checkpoint: Optional[Path] = None  # explicit checkpoint for an architecture name


class DataSourceSection(Section):
    """Where a data set is read from."""

    dataset: str = "cifar10"
    dir: Annotated[Optional[Path], NON_RESULT] = None  # default: $DENT_DATA, ../shared/data, ./data
    # fetch from the official source (with checksum) when not found locally
    download: Annotated[bool, NON_RESULT] = False


class DataSection(DataSourceSection):
    """A class-stratified subset of a split, in batches."""

    split: str = "test"
    n_images: Annotated[int, Field(ge=1)] = 1000
    seed: int = 0  # seed of the class-stratified subset
    batch_size: Annotated[int, Field(ge=1)] = 128


class OutputSection(Section):
    root: Path = Path("runs")
    name: Optional[str] = None  # run directory name; default <command>-<result hash[:8]>
    # mirror the config and metrics into RUN_DIR/tensorboard (dent.tracking; the optional tensorboard package)
    tracking: Tracking = Tracking.NONE


ConfigT = TypeVar("ConfigT", bound="CommandConfig")


#: The key by which a config file names the config file it is based on (see :meth:`CommandConfig.read_file`).
BASE_KEY = "base"


def file_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """A config file and the files it is based on (``base:``), the first base first: each with its own keys."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    path = Path(path)
    while True:
        data = read_yaml(path)
        base = data.pop(BASE_KEY, None)
        chain.insert(0, (path, data))
        if base is None:
            return chain
        if not isinstance(base, str) or not base:
            raise ConfigError(f"config file {str(path)!r}: {BASE_KEY!r} must be the path of another config file "
                              f"(relative to this one), got {base!r}")
        base_path = Path(os.path.normpath(path.parent / base))
        seen = [p.resolve() for p, _ in chain]
        if base_path.resolve() in seen:
            cycle = " -> ".join(str(p) for p in (*reversed(seen), base_path.resolve()))
            raise ConfigError(f"config file {str(path)!r}: {BASE_KEY!r} {base!r} makes a cycle ({cycle})")
        path = base_path


class CommandConfig(Section):
    """Base of a command's config: where its outputs go, how it is loaded and how its run directory is named."""

    output: Annotated[OutputSection, NON_RESULT] = OutputSection()

    #: Sections that a config file replaces as a whole instead of merging into the defaults (named lists).
    replaced_whole: ClassVar[frozenset[str]] = frozenset()
    #: Sections of entries the config names (``defenses``): an override below a name the config does not define
    #: (``defenses.dent_pluss.steps 2``) is an error, not a new entry; a new entry is given whole
    #: (``'defenses.mine={steps: 2}'``).
    named_entries: ClassVar[tuple[str, ...]] = ()
    #: Sections holding one entry whose kind decides its keys (``dent serve``'s ``defense``): an override of the
    #: section's own name (``'defense={kind: jpeg}'``) replaces it whole instead of merging into the default.
    single_entries: ClassVar[tuple[str, ...]] = ()
    #: Dotted keys of the former all-commands config that this command does not have. Configs written by it
    #: (``config.yaml`` files, stored run configs) still load: these keys are dropped from them.
    legacy_keys: ClassVar[tuple[str, ...]] = ()

    def result_hash(self) -> str:
        return flat_hash(result_tree(self))

    def run_dir(self, command: str, result_hash: str | None = None) -> Path:
        """``output.root / output.name``, default ``output.root / <command>-<result hash[:8]>``.

        ``result_hash`` replaces this config's own when the run's identity covers more (e.g. a model passed in).
        """
        return self.output.root / (self.output.name or f"{command}-{(result_hash or self.result_hash())[:8]}")

    @classmethod
    def load(cls: type[ConfigT], cfg_file: str | Path | None = None, overrides: Iterable[str] = (),
             file_defaults: dict[str, Any] | None = None) -> ConfigT:
        """Resolve a config: defaults, then the YAML file, then ``KEY VALUE`` / ``KEY=VALUE`` overrides.

        ``file_defaults`` stands in for the YAML file when none is given (a command's built-in job).
        """
        file_data = cls.read_file(cfg_file) if cfg_file is not None else dict(file_defaults or {})
        data = cls.merged(cls().to_dict(), cls.without_legacy_keys(file_data))
        keys = [key.strip().lower() for key, _ in override_pairs(overrides)]
        cls.check_named_entries(data, keys)
        for section in set(cls.single_entries).intersection(keys):  # given whole: not merged into the default
            data[section] = {}
        return validated(cls, deep_merge(data, parse_overrides(overrides)))

    @classmethod
    def check_named_entries(cls, data: dict[str, Any], keys: Iterable[str]) -> None:
        """Refuse an override key below an entry of :attr:`named_entries` that neither ``data`` nor an earlier
        whole-entry override defines."""
        known = {section: list(data.get(section, {})) for section in cls.named_entries}
        for key in keys:
            section, _, rest = key.strip().lower().partition(".")
            name, _, below = rest.partition(".")
            if section not in known or not name:
                continue
            if not below:  # a whole entry: defines the name for the overrides after it
                known[section].append(name)
            elif name not in known[section]:
                defined = ", ".join(known[section]) or "none"
                raise ConfigError(
                    f"override {key!r}: the config defines no {section} entry {name!r} (defined: {defined}); "
                    f"to add one on purpose, give the whole entry, e.g. '{section}.{name}={{{below}: ...}}'"
                )

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """A config file's sections over those of the file it names as ``base`` (a path relative to it).

        A file that differs from another in a few keys says ``base: other.yaml`` and only those keys, instead
        of a pasted copy that drifts; bases may have bases of their own.
        """
        data: dict[str, Any] = {}
        for _, own in file_chain(path):
            data = cls.merged(data, own)
        return data

    @classmethod
    def key_sources(cls: type[ConfigT], cfg_file: str | Path | None, overrides: Iterable[str] = ()
                    ) -> tuple[ConfigT, dict[str, str]]:
        """The resolved config and, for each of its dotted keys, where its value comes from: ``default``, the
        config file that sets it (``file PATH``, a base file too), or ``override``."""
        cfg = cls.load(cfg_file, overrides)
        given: dict[str, str] = {}
        for path, own in (file_chain(cfg_file) if cfg_file is not None else []):
            for section in cls.replaced_whole & own.keys():  # the file's entries replace the earlier ones
                given = {k: v for k, v in given.items() if not k.startswith(f"{section}.")}
            given.update({key.lower(): f"file {path}" for key in flatten(own)})
        changed = [key.strip().lower() for key, _ in override_pairs(overrides)]
        sources = {}
        for key in flatten(cfg.to_dict()):
            if any(key == c or key.startswith(f"{c}.") for c in changed):
                sources[key] = "override"
            else:
                sources[key] = given.get(key, "default")
        return cfg, sources

    @classmethod
    def merged(cls, under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        """``over`` merged into ``under``; sections of :attr:`replaced_whole` in ``over`` replace ``under``'s."""
        under = dict(under)
        for key in cls.replaced_whole & over.keys():
            under[key] = {}
        return deep_merge(under, over)

    @classmethod
    def from_stored(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Validate a config stored by an earlier run (its legacy keys dropped)."""
        return validated(cls, cls.without_legacy_keys(data))

    @classmethod
    def without_legacy_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for dotted in cls.legacy_keys:
            *parents, leaf = dotted.split(".")
            node = out
            for part in parents:
                if not isinstance(node.get(part), dict):
                    break
                node[part] = node = dict(node[part])
            else:
                node.pop(leaf, None)
        return out


class ModelDataConfig(CommandConfig):
    """``dent accuracy`` and ``dent models``: a model and a data subset."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    device: Annotated[DeviceName, NON_RESULT] = "auto"

    legacy_keys = ("defenses", "attack", "evaluation", "train", "bench", "seed")
