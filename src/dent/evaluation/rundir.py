"""A run directory: the resolved config, its hash, the results store, the log, the report.

Layout::

    RUN_DIR/config.yaml       the resolved config of the run (every key)
    RUN_DIR/config.hash       the hash of its result-affecting keys
    RUN_DIR/provenance.json   versions, machine, command line
    RUN_DIR/results.sqlite    finished units (see dent.evaluation.store)
    RUN_DIR/evaluate.log      our log and pyautoattack's
    RUN_DIR/report/           written by `dent report` (and at the end of `dent evaluate`)

The store also keeps the config and its hash (``meta``): that copy is what a resumed run is checked
against, so editing config.yaml by hand cannot make results of different configs mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dent.confbase import config_hash
from dent.errors import ConfigError, DentError
from dent.evaluation.config import NON_RESULT_KEYS
from dent.evaluation.store import STORE_NAME, ResultStore
from dent.provenance import write_run_metadata

CONFIG_NAME = "config.yaml"
HASH_NAME = "config.hash"
LOG_NAME = "evaluate.log"
REPORT_DIR = "report"


class ConfigMismatchError(ConfigError):
    """A run directory holds results of a config whose result-affecting keys differ from the new one."""


class NotARunError(DentError):
    """A path given as a run directory is not one."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists and scalars are leaves."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The result-affecting keys of a resolved config, flattened."""
    return {k: v for k, v in flatten(config).items() if not _excluded(k)}


def result_hash(config: dict[str, Any]) -> str:
    return config_hash(result_config(config))


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every result-affecting key that differs (missing = None)."""
    a, b = result_config(old), result_config(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def open_run(run_dir: Path, config: dict[str, Any]) -> ResultStore:
    """Open (or create) the run in ``run_dir`` for ``config``; refuse if it holds another config's results."""
    run_dir = Path(run_dir)
    store_path = run_dir / STORE_NAME
    new_hash = result_hash(config)
    store = ResultStore(store_path)
    stored = store.get_meta("config")
    # A store without units holds nothing to mix up: its config is simply replaced.
    if stored is not None and result_hash(stored) != new_hash and len(store) > 0:
        diff = differing_keys(stored, config)
        store.close()
        lines = "\n".join(f"  {key}: {old!r} (stored) -> {new!r} (now)" for key, old, new in diff)
        raise ConfigMismatchError(
            f"run directory {run_dir} holds results of a different config; refusing to mix them.\n"
            f"Result-affecting keys that differ:\n{lines}\n"
            "Choose a fresh run directory (output.name NAME) or restore these values to resume."
        )
    store.set_meta("config", config)
    store.set_meta("config_hash", new_hash)
    write_run_metadata(run_dir, config)
    (run_dir / HASH_NAME).write_text(new_hash + "\n")
    return store


def find_store(path: str | Path) -> Path:
    """The results store of a run directory (or a store file given directly); clear error otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".sqlite":
        return path
    if not path.exists():
        raise NotARunError(f"{path} does not exist; expected a run directory written by `dent evaluate`")
    if not path.is_dir() or not (path / STORE_NAME).is_file():
        raise NotARunError(
            f"{path} is not a run directory: it has no {STORE_NAME} (expected a directory written by "
            "`dent evaluate`, or a .sqlite store file)"
        )
    return path / STORE_NAME


def load_run_config(path: str | Path) -> dict[str, Any]:
    """The config stored with a run (from its store, else its config.yaml)."""
    store_path = find_store(path)
    with ResultStore(store_path, create=False) as store:
        config = store.get_meta("config")
    if config is None:
        yaml_path = store_path.parent / CONFIG_NAME
        if not yaml_path.is_file():
            raise NotARunError(f"{store_path} holds no config and there is no {yaml_path}")
        config = yaml.safe_load(yaml_path.read_text())
    return config
