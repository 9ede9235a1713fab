"""Typed, validated configuration sections (pydantic) and yacs-style overrides.

Each layer of the package defines its own section (e.g. :class:`dent.defenses.DentConfig`); each command's
config (:mod:`dent.sections` and the command's package) composes them. Sections forbid unknown keys and check
types once, at construction, so a bad value is reported with its dotted key and the expected type. Fields
carry markers (:data:`NON_RESULT`, :data:`OMITTED_AT_DEFAULT`) that say how they count in a run's identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, SerializationInfo, ValidationError, model_serializer

from dent.errors import ConfigError


@dataclass(frozen=True)
class FieldMarker:
    """A tag put in a field's ``Annotated[...]`` metadata: ``device: Annotated[str, NON_RESULT] = "auto"``."""

    name: str


#: The field does not change any result (where things are read and stored, the device, display, how the work
#: is split): :mod:`dent.identity` leaves it out of result hashes, so changing it never forks or refuses a run.
NON_RESULT = FieldMarker("non-result")

#: The field was added after results were stored: serialized only when it differs from its default, so saved
#: configs, run hashes and unit keys of earlier runs stay valid (and resumable).
OMITTED_AT_DEFAULT = FieldMarker("omitted-at-default")

#: Key of a serialization context naming a marker whose fields are left out too (see :mod:`dent.identity`).
DROP_KEY = "drop"


class Section(BaseModel):
    """Base class of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True, use_enum_values=False)

    @classmethod
    def marked(cls, marker: FieldMarker) -> tuple[str, ...]:
        """The names of this section's fields that carry ``marker``."""
        return tuple(name for name, info in cls.model_fields.items() if any(m is marker for m in info.metadata))

    @model_serializer(mode="wrap")
    def _serialize_marked(self, handler: Any, info: SerializationInfo) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            fields = type(self).model_fields
            for name in self.marked(OMITTED_AT_DEFAULT):
                if name in data and getattr(self, name) == fields[name].get_default(call_default_factory=True):
                    del data[name]
            dropped = (info.context or {}).get(DROP_KEY)
            if dropped is not None:
                for name in self.marked(dropped):
                    data.pop(name, None)
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "Section":
        """A copy with ``changes`` applied and validated."""
        return validated(type(self), {**self.to_dict(), **changes})


def validated(cls: type[Section], data: dict[str, Any], where: str = "") -> Section:
    """Build ``cls`` from ``data``; on failure raise :class:`ConfigError` naming each bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
        if where:
            key = f"{where}.{key}" if key else where
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"config key {key!r}: {err['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse yacs-style ``KEY VALUE`` pairs and ``KEY=VALUE`` items into a nested dict.

    Keys are dotted and case-insensitive (``MODEL.ARCH`` == ``model.arch``); values are parsed as YAML
    scalars or lists (``10``, ``true``, ``[1, 2]``), so ``8/255`` stays a string for the fraction parser.
    """
    nested: dict[str, Any] = {}
    for key, value in override_pairs(items):
        set_dotted(nested, key, parse_value(value))
    return nested


def override_pairs(items: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(dotted key, value text)`` pairs of ``KEY VALUE`` / ``KEY=VALUE`` override items, in order."""
    items = list(items)
    flat: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        item = items[i]
        if "=" in item and not item.startswith("="):
            key, value = item.split("=", 1)
            i += 1
        elif i + 1 < len(items):
            key, value = item, items[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {item!r} has no value; write 'KEY VALUE' or 'KEY=VALUE'")
        flat.append((key, value))
    return flat


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = [p.lower() for p in dotted_key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"malformed config key {dotted_key!r}; expected dotted names like model.arch")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted_key!r} goes below a value that is not a section")
    node[parts[-1]] = value


def lower_keys(tree: Any) -> Any:
    """Lower-case section keys recursively (YAML files may use the seed's upper-case style)."""
    if isinstance(tree, dict):
        return {str(k).lower(): lower_keys(v) for k, v in tree.items()}
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(read_config_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return lower_keys(data)


def read_config_text(path: Path) -> str:
    """The text of config file ``path``; :class:`ConfigError` when it is missing, a directory or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); expected a YAML file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None


def as_section(cls: type[Section], value: Any, where: str) -> Section:
    """``value`` as a ``cls``: the object itself, or a mapping validated as the same keys in a config file.

    Python callers may pass a plain dict wherever a config section is expected; anything else is a
    :class:`ConfigError` that says what ``where`` (the argument) expected.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return validated(cls, dict(value))
    raise ConfigError(
        f"{where}: expected a {cls.__module__}.{cls.__name__} or a dict of its config keys, got {type(value).__name__}"
    )


def config_hash(data: dict[str, Any]) -> str:
    """A stable short hash of a config's resolved values."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
