"""One call that evaluates defenses and returns their table (RobustBench's ``benchmark(model, ...)``, for dent).

:func:`benchmark_defenses` takes a zoo name or any ``nn.Module`` on [0, 1] inputs, defenses of the registry
(:mod:`dent.defenses.kinds`: dent's configs, transforms, detectors, your own class) and the attack section
(AutoAttack as in the paper, the adaptive attacks, PGD, C&W, ...), runs :func:`~dent.evaluation.runner.evaluate`
with its durable store (a re-run resumes), and returns :class:`Results`: the table with its 95% intervals, which
prints like ``dent evaluate`` and converts to a DataFrame-like dict of columns. ``dent evaluate`` is
:func:`benchmark_config` on the config it resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from dent.confbase import Section, as_section, deep_merge
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.report import csv_rows, main_table, settings_text
from dent.evaluation.runner import EvaluationRun, evaluate
from dent.evaluation.summary import WORST, Summary

#: The columns of :meth:`Results.to_dict` (a subset of the report's results.csv).
COLUMNS = ("model", "defense", "batch_size", "measure", "attack", "label", "correct", "n", "accuracy", "ci_low",
           "ci_high")


@dataclass
class Results:
    """An evaluation's table: per model and defense, clean accuracy and each attack's per-label and worst-case
    accuracy, each with its 95% Wilson interval over the N images."""

    summary: Summary
    run: EvaluationRun

    def __str__(self) -> str:
        return f"{settings_text(self.summary)}\n\n{main_table(self.summary)}"

    def to_dict(self) -> dict[str, list[Any]]:
        """Columns of equal length (``pandas.DataFrame(results.to_dict())``): one row per model x defense x batch
        size x measure (``natural``, or ``adversarial`` with the attack's ``label``: each attack, ``worst case``)."""
        rows = csv_rows(self.summary)
        return {column: [row.get(column) for row in rows] for column in COLUMNS}

    def accuracy(self, defense: str, attack: Optional[str] = None, label: str = WORST) -> float:
        """The clean accuracy of ``defense`` (``attack`` None), or its accuracy under ``attack`` (a point's label,
        as in the table) and ``label`` (default: the per-point worst case)."""
        table = self.to_dict()
        for i, name in enumerate(table["defense"]):
            natural = attack is None and table["measure"][i] == "natural"
            attacked = attack is not None and table["attack"][i] == attack and table["label"][i] == label
            if name == defense and (natural or attacked):
                return table["accuracy"][i]
        raise KeyError(f"no result for defense {defense!r}, attack {attack!r}, label {label!r}; the table has "
                       f"defenses {sorted(set(table['defense']))} and attacks {sorted(set(filter(None, table['attack'])))}")


def benchmark_defenses(
    model: str | nn.Module,
    *,
    defenses: Optional[Mapping[str, Any]] = None,
    attack: Optional[Mapping[str, Any] | Section] = None,
    n_images: Optional[int] = None,
    batch_size: Optional[int] = None,
    config: Optional[str | Path | Mapping[str, Any]] = None,
    run_dir: Optional[str | Path] = None,
    name: Optional[str] = None,
    **keys: Any,
) -> Results:
    """Evaluate ``defenses`` around ``model`` under ``attack`` and return the table.

    ``model``: a zoo name (``dent models``) or an ``nn.Module`` (identified by its weights' digest; ``name``, a zoo
    name, labels it in the table, e.g. the RobustBench model it was loaded as).
    ``defenses``: ``{name: entry}``, each entry a ``defenses:`` config entry (a dict, a kind name, a
    ``DentConfig``); ``attack``: the ``attack`` section (a dict or ``AttackSection``); ``config``: a config file or
    dict they are applied over (default: the evaluate defaults); further sections as keywords (``evaluation=``,
    ``data=``, ``seed=``, ``device=``, ``output=``). Example::

        results = dent.benchmark_defenses("autoattack_resnet18", defenses={"static": {"steps": 0}, "dent": {"steps": 10}},
                                 attack={"threats": ["Linf:8/255"], "version": "standard"}, n_images=100)
        print(results); results.to_dict(); results.accuracy("dent", "AA-standard Linf 8/255")
    """
    base = EvaluateConfig.load(config) if isinstance(config, (str, Path)) else EvaluateConfig.load(
        None, file_defaults=dict(config or {}))
    update: dict[str, Any] = {**keys}
    if isinstance(model, str) or name is not None:
        update["model"] = {**update.get("model", {}), "arch": model if isinstance(model, str) else name}
    if n_images is not None or batch_size is not None:
        data = dict(update.get("data", {}))
        data.update({k: v for k, v in (("n_images", n_images), ("batch_size", batch_size)) if v is not None})
        update["data"] = data
    if attack is not None:
        update["attack"] = attack.to_dict() if isinstance(attack, Section) else dict(attack)
    tree = deep_merge(base.to_dict(), update)
    if defenses is not None:
        tree["defenses"] = {name: entry.to_dict() if isinstance(entry, Section) else entry
                            for name, entry in defenses.items()}
    cfg = as_section(EvaluateConfig, tree, "benchmark_defenses(...)")
    return benchmark_config(cfg, model=None if isinstance(model, str) else model, run_dir=run_dir)


def benchmark_config(cfg: EvaluateConfig, *, model: Optional[nn.Module] = None,
                     run_dir: Optional[str | Path] = None) -> Results:
    """:func:`benchmark_defenses` on a resolved config (``dent evaluate``)."""
    from dent.evaluation.report import load_summary

    from dent.tracking import open_tracker

    run = evaluate(cfg, model=model, run_dir=Path(run_dir) if run_dir is not None else None)
    results = Results(load_summary([run.run_dir]), run)
    tracker = open_tracker(cfg.output.tracking, run.run_dir)
    try:
        tracker.log_config(cfg.to_dict())
        table = results.to_dict()
        for i, defense in enumerate(table["defense"]):
            measure = "clean" if table["measure"][i] == "natural" else f"{table['attack'][i]}/{table['label'][i]}"
            tracker.log_scalars(0, {f"accuracy/{defense}/{measure}": table["accuracy"][i]})
    finally:
        tracker.close()
    return results
