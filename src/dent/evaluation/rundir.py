"""A run directory: the resolved config, its hash, the results store, the log, the report.

Layout::

    RUN_DIR/config.yaml       the resolved config of the run (every key)
    RUN_DIR/config.hash       the run's result hash (its name is evaluate-<hash[:8]> by default)
    RUN_DIR/provenance.json   versions, machine, command line
    RUN_DIR/results.sqlite    finished units (see dent.evaluation.store)
    RUN_DIR/evaluate.log      our log and pyautoattack's
    RUN_DIR/report/           written by `dent report` (and at the end of `dent evaluate`)

The store also keeps the config, its hash and the identity of the model and data measured (``meta``): that
copy is what a resumed run is checked against, so editing config.yaml by hand cannot make results of
different configs mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dent.errors import ConfigError, DentError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.store import STORE_NAME, ResultStore
from dent.identity import flat_hash, refuse_mixing, result_tree
from dent.outputs import RUN_DIR_HINT, output_dir, writing
from dent.provenance import write_run_metadata

CONFIG_NAME = "config.yaml"
HASH_NAME = "config.hash"
LOG_NAME = "evaluate.log"
#: The store's meta key of the model and data measured (see :func:`dent.evaluation.runner.measured_identity`).
IDENTITY_META = "identity"
REPORT_DIR = "report"


class ConfigMismatchError(ConfigError):
    """A run directory holds results of a config whose result-affecting keys differ from the new one."""


class NotARunError(DentError):
    """A path given as a run directory is not one."""


#: The parts of the measured identity that no config key names: digests of a model or data passed in as objects.
PASSED_IN = {"model": ("module", "digest"), "data": ("digest",)}


def run_tree(cfg: EvaluateConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """A run's result tree: its config's, plus the digests of a model or data passed in (under ``identity``).

    Runs of named models and data have exactly their config's tree, so their hashes predate this.
    """
    tree = result_tree(cfg)
    passed = {part: {k: identity[part][k] for k in keys if k in identity.get(part, {})}
              for part, keys in PASSED_IN.items()}
    passed = {part: values for part, values in passed.items() if values}
    if passed:
        tree["identity"] = passed
    return tree


def run_hash(cfg: EvaluateConfig, identity: dict[str, Any]) -> str:
    """The hash of a run's result tree: what names its default directory and guards resuming it."""
    return flat_hash(run_tree(cfg, identity))


def stored_run_tree(store: ResultStore) -> dict[str, Any]:
    """The result tree of the run a store holds, from its stored config (re-validated) and identity."""
    try:
        cfg = EvaluateConfig.from_stored(store.get_meta("config"))
    except ConfigError as exc:
        raise ConfigMismatchError(f"the config stored in {store.path} is not one this version can read: {exc}") from None
    return run_tree(cfg, store.get_meta(IDENTITY_META) or {})


def open_run(run_dir: Path, cfg: EvaluateConfig, identity: dict[str, Any]) -> ResultStore:
    """Open (or create) the run in ``run_dir`` for ``cfg`` measuring ``identity``; refuse if it holds another
    run's results (a different result tree)."""
    run_dir = Path(run_dir)
    new_tree = run_tree(cfg, identity)
    new_hash = flat_hash(new_tree)
    output_dir(run_dir, "run directory", RUN_DIR_HINT)
    store = ResultStore(run_dir / STORE_NAME)
    try:
        # A store without units holds nothing to mix up: its config is simply replaced.
        if store.get_meta("config") is not None and len(store) > 0:
            stored_tree = stored_run_tree(store)
            if flat_hash(stored_tree) != new_hash:
                refuse_mixing(
                    stored_tree, new_tree, error=ConfigMismatchError,
                    problem=f"run directory {run_dir} holds results of a different config; refusing to mix them.",
                    advice="Choose a fresh run directory (output.name NAME) or restore these values to resume.",
                )
        config = cfg.to_dict()
        store.set_meta("config", config)
        store.set_meta("config_hash", new_hash)
        store.set_meta(IDENTITY_META, identity)
    except BaseException:
        store.close()
        raise
    with writing(run_dir, "run directory", RUN_DIR_HINT):
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
