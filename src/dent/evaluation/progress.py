"""Progress of an evaluation over its units, weighted by what each unit is expected to cost.

A clean unit is one defended call (and its input gradient) per batch, an attacked one up to hundreds of
queries: counting units would promise an ETA that the first attacked unit breaks. Each unit weighs its
expected defense calls times the defense's declared cost (``Traits.cost``, in forward passes). On a terminal
the bar shows the weighted share done and its ETA; otherwise (a log file, CI) one line per finished unit,
never a redrawn bar.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm.auto import tqdm

from dent.defenses.protocol import Traits
from dent.evaluation.unitrun import expected_queries
from dent.evaluation.units import CLEAN, Unit

#: Defense calls assumed for an attack whose query count is not known in advance (PGD, the adaptive attacks).
UNKNOWN_QUERIES = 100
#: A gradient query (forward and input backward) in forward passes.
QUERY_COST = 3.0


def attack_queries(unit: Unit) -> Optional[int]:
    """At most how many defense calls an attacked unit makes, where that is known in advance (AutoAttack)."""
    return expected_queries(unit.point) if unit.point.name == "autoattack" else None


def unit_weight(unit: Unit, traits: Traits, clean_draws: int = 1) -> float:
    """The expected cost of ``unit`` in forward passes of the model, for a defense of ``traits``."""
    if unit.kind == CLEAN:  # logits with the plain gradient, then (randomized) the other draws
        return (QUERY_COST + (clean_draws - 1 if traits.randomized else 0)) * traits.cost
    return (attack_queries(unit) or UNKNOWN_QUERIES) * QUERY_COST * traits.cost


class UnitProgress:
    """``start(unit)`` / ``done(unit, seconds)`` around each unit of ``weights`` (unit key -> weight)."""

    def __init__(self, weights: dict[str, float], enabled: bool, terminal: Optional[bool] = None):
        self.weights, self.total = weights, sum(weights.values()) or 1.0
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.finished = 0.0
        self.count = 0
        self.start_time = time.perf_counter()
        self.bar = None
        if enabled and self.terminal:
            self.bar = tqdm(total=self.total, desc="evaluate", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}% of the expected work|{bar}| "
                                       "[{elapsed}<{remaining}] {postfix}")

    def start(self, unit: Unit) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(unit.describe(), refresh=True)

    def done(self, unit: Unit, seconds: float) -> None:
        weight = self.weights.get(unit.key, 0.0)
        self.finished += weight
        self.count += 1
        if self.bar is not None:
            self.bar.update(weight)
        elif self.enabled:
            print(f"[{self.count}/{len(self.weights)}] {unit.describe()}: {seconds:.1f} s; "
                  f"{100 * self.finished / self.total:.0f}% of the expected work, ETA {self.eta()}",
                  file=sys.stderr, flush=True)

    def eta(self) -> str:
        if self.finished <= 0:
            return "unknown"
        left = (time.perf_counter() - self.start_time) * (self.total - self.finished) / self.finished
        return f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min" if left < 7200 else f"{left / 3600:.1f} h"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
