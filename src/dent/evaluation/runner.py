"""Run an evaluation: plan its units, skip the stored ones, run and persist the rest one by one.

The Python API is :func:`evaluate`; ``dent evaluate`` is a thin layer over it. Tests (and notebooks)
can pass a model, a data split and a defense factory directly instead of loading them by name.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from dent.attacks.config import AAVersion
from dent.attacks.registry import ATTACKS
from dent.confbase import Section, as_section
from dent.data.split import images_and_labels
from dent.defenses.kinds import build_defense, resolved_defense
from dent.defenses.detection import rejects
from dent.defenses.protocol import traits_of
from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig, Executor
from dent.evaluation.executors import UnitWork, UnitWorker, import_ray, run_locally, run_on_ray
from dent.evaluation.rundir import LOG_NAME, open_run, run_hash
from dent.evaluation.progress import UnitProgress, unit_weight
from dent.evaluation.runlog import run_logging
from dent.evaluation.store import STORE_NAME, ResultStore, UnitRecord
from dent.evaluation.units import CLEAN, Unit, plan_units, repeat_context
from dent.evaluation.unitrun import ADVERSARIAL_DIR
from dent.identity import data_digest, file_digest, model_identity
from dent.models.inputs import check_channels, input_channels
from dent.runtime import resolve_device, use_deterministic_kernels
from dent.threat import check_eps

log = logging.getLogger("dent.evaluation")

#: Builds a defense around the model from its ``defenses:`` entry (default: :func:`dent.defenses.kinds.build_defense`).
DefenseFactory = Callable[[nn.Module, Section], nn.Module]


@dataclass
class EvaluationRun:
    """What :func:`evaluate` did."""

    run_dir: Path
    store_path: Path
    config_hash: str
    n_units: int  # units of this shard
    n_skipped: int  # already stored when the run started
    n_run: int  # computed now
    seconds: float
    dynamic_warnings: int  # units in which AutoAttack warned that the model is a dynamic defense


def load_model_from_config(cfg: EvaluateConfig) -> nn.Module:
    from dent.models import load_model

    return load_model(
        cfg.model.arch, threat_model=cfg.model.threat_model, model_dir=cfg.model.model_dir,
        checkpoint=cfg.model.checkpoint,
    )


def load_data_from_config(cfg: EvaluateConfig, subset_seed: int):
    from dent.data import load_subset

    return load_subset(
        cfg.data.dataset, cfg.data.split, n=cfg.data.n_images, seed=subset_seed,
        data_dir=cfg.data.dir, download=cfg.data.download,
    )


def subset_seeds(cfg: EvaluateConfig) -> list[int]:
    """The subset seed of each repeat: ``data.seed + r`` with ``evaluation.repeat_subsets``, else ``data.seed``."""
    step = 1 if cfg.evaluation.repeat_subsets else 0
    return [cfg.data.seed + step * r for r in range(cfg.evaluation.repeats)]


def evaluation_subsets(cfg: EvaluateConfig, data: Any = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The images and labels evaluated, by subset seed: ``data`` (its first ``data.n_images``) or loaded."""
    seeds = sorted(set(subset_seeds(cfg)))
    if data is not None:
        if len(seeds) > 1:
            raise ConfigError(
                "config key 'evaluation.repeat_subsets': each repeat draws its own subset from the data set, "
                "which needs the data loaded from the config; set it to false when passing data in"
            )
        splits = {seeds[0]: data}
    else:
        splits = {seed: load_data_from_config(cfg, seed) for seed in seeds}
    subsets = {}
    for seed, split in splits.items():
        images, labels = images_and_labels(split, "evaluate(data=...)")
        if len(labels) < cfg.data.n_images:
            raise ConfigError(f"config key 'data.n_images': {cfg.data.n_images} images requested but the split "
                              f"has only {len(labels)}")
        subsets[seed] = (images[: cfg.data.n_images], labels[: cfg.data.n_images])
    return subsets


def measured_identity(cfg: EvaluateConfig, model: Optional[nn.Module] = None,
                      data: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, dict[str, Any]]:
    """The model and data measured, as unit keys include them and the store's meta ``identity`` records them.

    Named models and data are identified by the config (a checkpoint also by its file digest); a ``model``
    or ``data`` (images, labels) passed in is identified by the digest of its tensors.
    """
    ident_model: dict[str, Any] = {"arch": cfg.model.arch, "threat_model": cfg.model.threat_model.value}
    if cfg.model.checkpoint is not None:
        path = Path(cfg.model.checkpoint)
        ident_model["checkpoint"] = file_digest(path) if path.is_file() else str(path)
    if model is not None:
        ident_model.update(model_identity(model))
    ident_data: dict[str, Any] = {"dataset": cfg.data.dataset, "split": cfg.data.split,
                                  "n_images": cfg.data.n_images, "subset_seed": cfg.data.seed}
    if data is not None:
        ident_data["digest"] = data_digest(*data)
    return {"model": ident_model, "data": ident_data}


def plan(cfg: EvaluateConfig, identity: dict[str, dict[str, Any]], n_images: int,
         image_dim: Optional[int] = None, device: Optional[torch.device] = None) -> list[Unit]:
    """The units of ``cfg`` (this shard's share, every repeat) for the model and data ``identity``.

    Defense configs are resolved for ``device`` (default: ``cfg.device``'s): a unit's key records the precision
    its defense computes in (``autocast='auto'`` becomes 'bfloat16' or 'none'), so a bf16 result never
    resumes a float32 run, and ``auto`` on machines that resolve it differently keys different units.
    """
    device = device or resolve_device(cfg.device)
    points = cfg.attack.points()
    if image_dim is not None:
        for point in points:
            try:
                check_eps(point.norm, point.eps, dim=image_dim)
            except ValueError as exc:
                raise ConfigError(f"config key 'attack.threats': {exc}") from None
    contexts = [repeat_context(identity, cfg.seed, r, seed, cfg.data.seed) for r, seed in enumerate(subset_seeds(cfg))]
    return plan_units(
        defenses={name: resolved_defense(config, device) for name, config in cfg.defenses.items()},
        points=points,
        n_images=n_images,
        batch_sizes=list(cfg.evaluation.batch_sizes) or [cfg.data.batch_size],
        contexts=contexts,
        clean=cfg.evaluation.clean,
        shard=cfg.evaluation.shard_index,
    )


def evaluate(
    cfg: EvaluateConfig,
    *,
    model: Optional[nn.Module] = None,
    data: Any = None,
    defense_factory: Optional[DefenseFactory] = None,
    run_dir: Optional[Path] = None,
) -> EvaluationRun:
    """Evaluate ``cfg``'s defenses on its model and data, resuming from the run directory's store.

    ``cfg`` may also be a plain dict of config keys (validated, missing keys at their defaults).
    ``model`` (a static ``nn.Module``), ``data`` (an object with ``images`` and ``labels``) and
    ``defense_factory`` replace loading them by name from the config. A model or data passed in is part of
    the run's identity (a digest of its tensors): it names the default run directory and keys every unit, so
    results of different models or data never stand in for each other.
    """
    start = time.perf_counter()
    cfg = as_section(EvaluateConfig, cfg, "evaluate(cfg)")
    use_deterministic_kernels()
    # Everything that can fail on bad input runs before the run directory is created or touched.
    p = prepare(cfg, model, data, run_dir)
    store = open_run(p.run_dir, cfg, p.identity)
    try:
        with run_logging(p.run_dir / LOG_NAME):
            return _evaluate(cfg, store, p.run_dir, p.chash, p.device, model, p.subsets, p.units, defense_factory,
                             start)
    finally:
        store.close()


@dataclass
class Prepared:
    """What an evaluation of a config measures, before anything runs: its data, identity, run and units."""

    device: torch.device
    subsets: dict[int, tuple[torch.Tensor, torch.Tensor]]
    identity: dict[str, dict[str, Any]]
    chash: str
    run_dir: Path
    units: list[Unit]


def prepare(cfg: EvaluateConfig, model: Optional[nn.Module] = None, data: Any = None,
            run_dir: Optional[Path] = None) -> Prepared:
    """Load the data and plan the units of ``cfg`` (see :func:`evaluate`); writes nothing."""
    device = resolve_device(cfg.device)
    if cfg.evaluation.executor == Executor.RAY:
        import_ray()  # without it, say how to install it before anything is written
    subsets = evaluation_subsets(cfg, data)
    first = subsets[cfg.data.seed]
    if model is not None:
        check_channels(input_channels(model, "evaluate(model=...)"), first[0], "evaluate(model=..., data=...)")
    identity = measured_identity(cfg, model, first if data is not None else None)
    chash = run_hash(cfg, identity)
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir("evaluate", chash)
    units = plan(cfg, identity, len(first[1]), image_dim=int(first[0][0].numel()), device=device)
    return Prepared(device, subsets, identity, chash, run_dir, units)


def _evaluate(cfg, store: ResultStore, run_dir, chash, device, model, subsets, units, defense_factory,
              start) -> EvaluationRun:
    log.info("evaluate: run %s, config hash %s, device %s, shard %s", run_dir, chash, device, cfg.evaluation.shard)
    done = store.done_keys()
    pending = [u for u in units if u.key not in done]
    n_skipped = len(units) - len(pending)
    log.info("%d units in this shard: %d already stored (skipped), %d to run", len(units), n_skipped, len(pending))
    if n_skipped:
        print(f"resuming {run_dir}: {n_skipped} of {len(units)} units already stored, {len(pending)} to run")

    if pending and model is None:
        model = load_model_from_config(cfg)
    local = cfg.evaluation.executor == Executor.LOCAL
    home = device if local else torch.device("cpu")  # Ray workers get the model from the CPU, to their device
    if model is not None:
        model = model.to(home).eval()
    factory = defense_factory or build_defense
    defended: dict[str, nn.Module] = {}
    for unit in pending:  # built before the first unit runs: their declared costs weigh the progress
        if unit.defense not in defended:
            defended[unit.defense] = factory(model, unit.defense_config).to(home)
            _warn_randomized(unit.defense, defended[unit.defense], cfg)
        if unit.kind != CLEAN:
            _refuse_rejecting(unit.defense, defended[unit.defense], unit.point.name)
    weights = {u.key: unit_weight(u, traits_of(defended[u.defense]), cfg.evaluation.clean_draws) for u in pending}
    bar = UnitProgress(weights, enabled=cfg.evaluation.progress)
    work = UnitWork(cfg, model, factory, subsets,
                    adversarial_dir=run_dir / ADVERSARIAL_DIR if cfg.evaluation.save_adversarial else None)
    if not pending:
        finished_units = iter(())
    elif local:
        finished_units = run_locally(pending, UnitWorker(work, defended, progress=cfg.evaluation.progress), bar.start)
    else:
        finished_units = run_on_ray(pending, work, cfg.evaluation.ray, bar.start)

    dynamic_warnings = 0
    rebatching: Counter[str] = Counter()
    for done in finished_units:  # the driver alone writes the store, each unit as it finishes
        unit, result = done.unit, done.result
        record = UnitRecord(
            key=unit.key, config_hash=chash, kind=unit.kind, defense=unit.defense, attack=unit.attack_label,
            batch_size=unit.batch_size, batch_index=unit.batch_index, spec=unit.spec, result=result,
            seconds=done.seconds, device=done.device, host=done.host,
        )
        store.put(record)
        bar.done(unit, done.seconds)
        _log_unit(unit, result, done.seconds, rebatching, done.worker)
        if result.get("notes", {}).get("dynamic_warning"):
            dynamic_warnings += 1
    bar.close()

    if dynamic_warnings:
        msg = (f"AutoAttack warned in {dynamic_warnings} unit(s) that the model seems to be a dynamic defense "
               "(expected for an adaptive or randomized one, as dent or SAP); see the log")
        log.warning(msg)
        print(msg)
    if rebatching:
        log.info("AutoAttack re-batched still-robust points between attacks in %d unit(s): "
                 "an adaptive defense adapted on the smaller batches (details per unit above)",
                 sum(rebatching.values()))
    seconds = time.perf_counter() - start
    log.info("evaluate: done in %.1f s (%d units run, %d skipped)", seconds, len(pending), n_skipped)
    return EvaluationRun(run_dir=run_dir, store_path=run_dir / STORE_NAME, config_hash=chash, n_units=len(units),
                         n_skipped=n_skipped, n_run=len(pending), seconds=seconds, dynamic_warnings=dynamic_warnings)


def _refuse_rejecting(name: str, defense: nn.Module, attack: str) -> None:
    """Most attacks count a point as broken when the answer is not its label, and may "succeed" by making a
    detector fire; only runners that declare ``reject_aware`` (PGD, C&W: a rejection is defended, the margin
    treats the reject class like the label) attack a defense that rejects. The others' numbers are not computed."""
    if rejects(defense) and not getattr(ATTACKS.get(attack), "reject_aware", False):
        aware = [n for n, runner in ATTACKS.items() if getattr(runner, "reject_aware", False)]
        raise ConfigError(
            f"defense {name!r} may reject its inputs (a detector, dent.defenses.detection), and attack.name {attack} "
            f"does not know the reject class (it would count a rejected input as broken, and could succeed by "
            f"making the detector fire); attacks that do: {', '.join(aware)} (with attack.loss margin for PGD)"
        )


def _warn_randomized(name: str, defense: nn.Module, cfg: EvaluateConfig) -> None:
    """A randomized defense answers differently per draw: one repeat measures one draw of its attacked accuracy,
    and AutoAttack without EOT (any version but ``rand``, no ``attack.eot_iter``) takes single-draw gradients."""
    if not traits_of(defense).randomized:
        return
    messages = []
    if cfg.evaluation.repeats == 1:
        messages.append(f"defense {name!r} is randomized: its attacked accuracies are of one draw (its clean "
                        "accuracy also over evaluation.clean_draws draws); evaluation.repeats R > 1 measures R "
                        "draws of everything (repeat r seeds its draws with seed + r)")
    single = [p for p in cfg.attack.points()
              if p.name == "autoattack" and p.version != AAVersion.RAND and not p.eot_iter]
    if single:
        messages.append(f"defense {name!r} is randomized: {single[0].label} takes single-draw gradients; an "
                        "adaptive attack averages over draws (attack.name declared_apgd, attack.version rand or "
                        "attack.eot_iter)")
    for msg in messages:
        log.warning(msg)
        print(msg)


def _log_unit(unit: Unit, result: dict[str, Any], seconds: float, rebatching: Counter, where: str) -> None:
    n = len(result["positions"])
    if unit.kind == CLEAN:
        correct = sum(p == y for p, y in zip(result["clean_pred"], result["labels"]))
        log.info("unit %s: clean %d/%d correct (%.1f s; %s) [%s]", unit.describe(), correct, n, seconds, where,
                 unit.key[:12])
        return
    accs = ", ".join(f"{label} {sum(flags)}/{n}" for label, flags in result["robust"].items())
    log.info("unit %s: robust %s (%.1f s; %s) [%s]", unit.describe(), accs, seconds, where, unit.key[:12])
    notes = result.get("notes", {})
    for warning in notes.get("warnings", []):
        log.info("unit %s: AutoAttack warned: %s", unit.describe(), warning)
    per_attack = notes.get("attacked_batch_sizes", {}).get("ensemble")
    if per_attack:
        sizes = "; ".join(f"{attack} attacked {'+'.join(map(str, s))} points" for attack, s in per_attack.items())
        log.info("unit %s: AutoAttack re-batching (each attack only gets the still-robust points): %s",
                 unit.describe(), sizes)
        if any(size < n for sizes_ in per_attack.values() for size in sizes_):
            rebatching["ensemble"] += 1
