"""``dent evaluate --dry-run``: what an evaluation would run and roughly what it would cost, without running it.

The units are planned exactly as :func:`dent.evaluation.runner.evaluate` plans them (those already in the run's
store are counted as done; the store is opened read-only and nothing is written). The cost is estimated from
one timed call of each defense on one batch of the real data: a clean unit costs its clean draws in forward
calls, an AutoAttack unit at most :func:`~dent.evaluation.unitrun.apgd_queries` gradient queries for its APGD
attacks (AutoAttack gives later attacks only the still-robust points, so the estimate is an upper bound); FAB-T
and Square, which run on the points APGD leaves robust, and attacks without a query count known in advance are
listed without an estimate.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dent.defenses.kinds import build_defense, kind_name
from dent.defenses.protocol import traits_of
from dent.evaluation.config import EvaluateConfig, Executor
from dent.evaluation.rundir import STORE_NAME
from dent.evaluation.runner import Prepared, load_model_from_config, prepare
from dent.evaluation.store import ResultStore
from dent.evaluation.unitrun import apgd_queries
from dent.models.zoo import architecture_without_weights
from dent.evaluation.units import CLEAN, Unit


@dataclass
class DefenseCost:
    """One defense's pending units and their estimated cost."""

    kind: str
    randomized: bool = False  # a randomized defense's clean units draw evaluation.clean_draws predictions
    units: int = 0
    calls: int = 0  # defense calls of the units whose count is known in advance
    unknown_units: int = 0  # units of attacks without a known query count
    # AutoAttack's attacks after APGD (FAB-T, Square): they run on the points APGD leaves robust
    after_apgd: set[str] = field(default_factory=set)
    forward_s: float = 0.0  # one clean call on one batch
    query_s: float = 0.0  # one gradient query (forward and backward) on one batch
    seconds: float = 0.0

    def add(self, unit: Unit, clean_draws: int) -> None:
        self.units += 1
        if unit.kind == CLEAN:  # the logits with their plain gradient, then the other draws
            draws = clean_draws if self.randomized else 1
            self.calls += draws
            self.seconds += self.query_s + (draws - 1) * self.forward_s
            return
        if unit.point.name != "autoattack":
            self.unknown_units += 1
            return
        queries, others = apgd_queries(unit.point)
        self.calls += queries
        self.seconds += queries * self.query_s
        self.after_apgd.update(others)


@dataclass
class DryRun:
    prepared: Prepared
    stored: int
    batch_size: int
    costs: dict[str, DefenseCost] = field(default_factory=dict)
    model_note: str = ""  # what the calls were timed on, when not the config's model itself
    workers: int = 1  # concurrent workers (evaluation.ray.workers with the Ray executor)

    @property
    def pending(self) -> int:
        return sum(cost.units for cost in self.costs.values())

    @property
    def seconds(self) -> float:
        return sum(cost.seconds for cost in self.costs.values())

    def text(self) -> str:
        p = self.prepared
        lines = [
            f"dry run: nothing was computed or written; run directory {p.run_dir}",
            f"units: {len(p.units)} planned, {self.stored} already stored, {self.pending} to run",
            "",
            f"| defense | kind | units to run | defense calls (at most) | s per call, batch {self.batch_size} "
            "(forward / gradient query) | estimate |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, c in self.costs.items():
            unknown = f" + {c.unknown_units} unit(s) of attacks without a known query count" if c.unknown_units else ""
            if c.after_apgd:
                unknown += f" + {', '.join(sorted(c.after_apgd))} on the points APGD leaves robust"
            lines.append(f"| {name} | {c.kind} | {c.units} | {c.calls}{unknown} | {c.forward_s:.3f} / {c.query_s:.3f} "
                         f"| {_duration(c.seconds)} |")
        lines += ["", f"defense calls in all: {sum(c.calls for c in self.costs.values())} (at most)",
                  f"estimate: {_duration(self.seconds)} on this machine's {p.device.type.upper()} (an upper bound "
                  "for AutoAttack: later attacks get only the still-robust points)"]
        if self.workers > 1:
            lines.append(f"with evaluation.executor ray and {self.workers} workers of one such "
                         f"device each: about {_duration(self.seconds / self.workers)} of wall time")
        if self.model_note:
            lines.append(self.model_note)
        return "\n".join(lines)


def dry_run(cfg: EvaluateConfig, model: Optional[nn.Module] = None) -> DryRun:
    """Plan ``cfg``'s units and time one call of each defense with pending units (see the module docstring)."""
    p = prepare(cfg)
    store_path = p.run_dir / STORE_NAME
    done: set[str] = set()
    if store_path.is_file():
        with ResultStore(store_path, create=False) as store:
            done = store.done_keys()
    pending = [u for u in p.units if u.key not in done]
    images, labels = p.subsets[cfg.data.seed]
    batch = min(cfg.data.batch_size, len(labels))
    x, y = images[:batch].to(p.device), labels[:batch].to(p.device)
    workers = cfg.evaluation.ray.workers if cfg.evaluation.executor == Executor.RAY else 1
    result = DryRun(p, len(p.units) - len(pending), batch, workers=workers)
    by_defense: dict[str, list[Unit]] = defaultdict(list)
    for unit in pending:
        by_defense[unit.defense].append(unit)
    if by_defense and model is None:
        if cfg.model.checkpoint is None:
            model = architecture_without_weights(cfg.model.arch, cfg.model.threat_model, cfg.model.model_dir)
        if model is not None:
            result.model_note = (f"timed on {cfg.model.arch}'s architecture with random weights: its checkpoint is "
                                 f"not on this machine (the weights do not change the cost)")
        else:
            model = load_model_from_config(cfg)
    for name, units in by_defense.items():
        config = units[0].defense_config
        defense = build_defense(model.to(p.device).eval(), config).to(p.device)
        cost = DefenseCost(kind_name(config), randomized=traits_of(defense).randomized,
                           forward_s=_timed_forward(defense, x), query_s=_timed_query(defense, x, y))
        for unit in units:
            cost.add(unit, cfg.evaluation.clean_draws)
        result.costs[name] = cost
    return result


def _timed_forward(defense: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        defense(x)
    return time.perf_counter() - start


def _timed_query(defense: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One attack query: the defense's logits and the cross-entropy's gradient w.r.t. the input."""
    start = time.perf_counter()
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        loss = F.cross_entropy(defense(xg), y)  # a detector's K + 1 logits too
        if loss.requires_grad:
            torch.autograd.grad(loss, xg, allow_unused=True)
    return time.perf_counter() - start


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
