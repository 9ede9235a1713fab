"""Units of work: one batch of the test subset, one defense, clean or under one attack point.

A unit is the smallest piece of an evaluation that is persisted on its own. Its key is the content hash
of everything that determines its result: the model, the data subset and the image positions in it, the
defense config, the attack point (norm, epsilon, attacks, budget), the batch size, the seed and the repeat. So

* a resumed run skips exactly the units already stored, whatever order they ran in;
* shards are disjoint sets of batches (batch ``b`` belongs to shard ``b % n``), so processes or machines
  can split the work and their stores merge by key;
* a unit computed under a different setting has a different key and can never stand in for another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

from dent.attacks.config import AttackPoint
from dent.confbase import Section
from dent.identity import result_tree

CLEAN = "clean"
ATTACK = "attack"


def content_hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Unit:
    kind: str  # CLEAN or ATTACK
    defense: str
    defense_config: Section  # a defense kind's config (dent.defenses.kinds)
    point: Optional[AttackPoint]
    batch_size: int
    batch_index: int
    positions: tuple[int, ...]  # positions in the evaluation subset
    # The model and data identity, the seed and (repeats r > 0 only) "repeat" and "repeat_of"; see `repeat_context`.
    context: dict[str, Any] = field(hash=False, compare=False)

    @property
    def repeat(self) -> int:
        return self.context.get("repeat", 0)

    @property
    def seed(self) -> int:
        return self.context["seed"]

    @cached_property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "defense": self.defense,
            "defense_config": result_tree(self.defense_config),
            "attack": None if self.point is None else result_tree(self.point),
            "batch_size": self.batch_size,
            "batch_index": self.batch_index,
            "positions": list(self.positions),
            **self.context,
        }

    @cached_property
    def key(self) -> str:
        return content_hash(self.spec)

    @property
    def attack_label(self) -> Optional[str]:
        return None if self.point is None else self.point.label

    def describe(self) -> str:
        what = "clean" if self.point is None else self.point.label
        repeat = f" | repeat {self.repeat}" if self.repeat else ""
        return f"{self.defense} | {what} | batch {self.batch_index} (size {self.batch_size}){repeat}"


def batch_positions(n: int, batch_size: int) -> list[tuple[int, ...]]:
    """Consecutive batches of positions 0..n-1; the last one may be smaller."""
    return [tuple(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def repeat_context(identity: dict[str, Any], seed: int, repeat: int, subset_seed: int,
                   base_subset_seed: int) -> dict[str, Any]:
    """The context of repeat ``repeat``: attack seed ``seed + repeat``, the repeat's subset seed.

    Repeat 0 has no ``repeat`` key, so its units keep the keys of an evaluation without repeats; a later
    repeat also records the seeds of repeat 0 (``repeat_of``), by which reports pool the repeats of one
    evaluation into one row.
    """
    context = {"model": identity["model"], "data": {**identity["data"], "subset_seed": subset_seed},
               "seed": seed + repeat}
    if repeat:
        context["repeat"] = repeat
        context["repeat_of"] = {"seed": seed, "subset_seed": base_subset_seed}
    return context


def plan_units(
    *,
    defenses: dict[str, Section],
    points: list[AttackPoint],
    n_images: int,
    batch_sizes: list[int],
    contexts: list[dict[str, Any]],
    clean: bool = True,
    shard: tuple[int, int] = (1, 1),
) -> list[Unit]:
    """All units of an evaluation (this shard's share), one set per repeat context: repeat-major, then
    defense-major, clean before attacks."""
    shard_i, shard_n = shard
    units = []
    for context in contexts:
        for name, dcfg in defenses.items():
            for batch_size in batch_sizes:
                batches = [(b, pos) for b, pos in enumerate(batch_positions(n_images, batch_size))
                           if b % shard_n == shard_i - 1]
                kinds: list[tuple[str, Optional[AttackPoint]]] = [(CLEAN, None)] if clean else []
                kinds += [(ATTACK, point) for point in points]
                for kind, point in kinds:
                    for b, pos in batches:
                        units.append(Unit(kind, name, dcfg, point, batch_size, b, pos, context))
    return units
