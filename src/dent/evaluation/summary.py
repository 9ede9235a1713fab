"""Aggregate stored per-point unit results into accuracies: the numbers behind every report.

Natural accuracy is the share of points the defense classifies correctly in clean batches. Robust
accuracy at an attack point is, per point, the worst case over every attack label stored for it (each
individually-run attack and/or the cumulative ensemble): a point counts as robust only if it withstood
all of them. Per-label accuracies (the paper's Table 2) are kept beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from dent.attacks.config import format_eps
from dent.evaluation.store import UnitRecord

WORST = "worst case"


@dataclass
class Cell:
    """A count of correct points out of ``n`` (``expected``: the evaluation's N images)."""

    correct: int = 0
    n: int = 0
    expected: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def complete(self) -> bool:
        return self.n >= self.expected

    def add(self, correct: int, n: int) -> None:
        self.correct += correct
        self.n += n


@dataclass
class PointResult:
    point: dict[str, Any]  # the attack point's fields
    worst: Cell
    per_label: dict[str, Cell] = field(default_factory=dict)
    dynamic_warning: bool = False
    per_point: dict[int, bool] = field(default_factory=dict)  # position -> robust under every label


@dataclass
class Row:
    """One model x defense x batch size."""

    model: str
    context: dict[str, Any]
    defense: str
    defense_config: dict[str, Any]
    batch_size: int
    natural: Optional[Cell] = None
    clean_seconds: float = 0.0  # time of the clean units (one defense call per batch)
    attacks: dict[str, PointResult] = field(default_factory=dict)  # point label -> result

    @property
    def steps(self) -> int:
        return int(self.defense_config.get("steps", 0))


@dataclass
class Summary:
    rows: list[Row]
    point_labels: list[str]  # in order of first appearance
    points: dict[str, dict[str, Any]]
    devices: list[str]
    notes: list[str]
    configs: list[dict[str, Any]] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """What every table and figure must state: model, N images, attack, epsilon, steps, seed."""
        contexts = {json.dumps(r.context, sort_keys=True): r.context for r in self.rows}.values()
        models = sorted({r.model for r in self.rows})
        data = sorted({f"{c['data']['dataset']} {c['data']['split']} (subset seed {c['data']['subset_seed']})" for c in contexts})
        n_images = sorted({c["data"]["n_images"] for c in contexts})
        covered = sorted({cell.n for r in self.rows for cell in _cells(r)})
        seeds = sorted({c["seed"] for c in contexts})
        attacks = []
        for label in self.point_labels:
            p = self.points[label]
            what = attack_description(p)
            if what not in attacks:
                attacks.append(what)
        threats = []
        for label in self.point_labels:
            p = self.points[label]
            t = f"{p['norm']} {format_eps(p['eps'], p['norm'])}"
            if t not in threats:
                threats.append(t)
        steps = {}
        for r in self.rows:
            steps.setdefault(r.defense, r.steps)
        return {
            "models": models,
            "data": data,
            "n_images": n_images,
            "n_points_covered": covered,
            "attacks": attacks,
            "threats": threats,
            "steps": steps,
            "batch_sizes": sorted({r.batch_size for r in self.rows}),
            "seeds": seeds,
            "devices": self.devices,
        }

    def caption(self) -> str:
        s = self.settings()
        n = "/".join(str(v) for v in s["n_images"])
        steps = ", ".join(f"{name} {k}" for name, k in s["steps"].items())
        return (
            f"model: {', '.join(s['models'])} | N={n} images, {', '.join(s['data'])} | "
            f"attack: {'; '.join(s['attacks'])} | eps: {', '.join(s['threats'])} | steps: {steps} | "
            f"batch size: {', '.join(map(str, s['batch_sizes']))} | seed: {', '.join(map(str, s['seeds']))}"
        )


def _cells(row: Row) -> Iterable[Cell]:
    if row.natural is not None:
        yield row.natural
    for pr in row.attacks.values():
        yield pr.worst


def attack_description(point: dict[str, Any]) -> str:
    """The attack of a point without its threat, e.g. ``AutoAttack custom (apgd-ce, apgd-t), 10 iter``."""
    if point.get("adaptive") is not None:
        from dent.attacks.adaptive_config import describe_point

        return describe_point(point)
    if point["name"] == "autoattack":
        out = f"AutoAttack {point['version']}"
        if point["version"] == "custom":
            out += " (" + ", ".join(point["attacks"]) + ")"
        if point.get("mode", "ensemble") != "ensemble":
            out += f" [{point['mode']}]"
    else:
        out = point["name"].upper()
        if point.get("n_restarts"):
            out += f", {point['n_restarts']} restarts"
    budget = []
    for key, name in (("n_iter", "iter"), ("n_target_classes", "targets"), ("n_queries", "queries"),
                      ("n_restarts", "restarts")):
        if point.get(key) is not None and not (key == "n_restarts" and point["name"] == "pgd"):
            budget.append(f"{point[key]} {name}")
    if budget:
        out += ", " + ", ".join(budget)
    return out


def summarize(records: Iterable[UnitRecord], configs: Iterable[dict[str, Any]] = (), duplicates: int = 0) -> Summary:
    configs = list(configs)
    defense_order: list[str] = []
    for cfg in configs:
        for name in cfg.get("defenses", {}):
            if name not in defense_order:
                defense_order.append(name)

    rows: dict[tuple, Row] = {}
    point_labels: list[str] = []
    points: dict[str, dict[str, Any]] = {}
    devices: list[str] = []
    for rec in records:
        spec = rec.spec
        context = {k: spec[k] for k in ("model", "data", "seed")}
        dcfg = spec["defense_config"]
        key = (json.dumps(context, sort_keys=True), rec.defense, json.dumps(dcfg, sort_keys=True), rec.batch_size)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(model=context["model"]["arch"], context=context, defense=rec.defense,
                                  defense_config=dcfg, batch_size=rec.batch_size)
        if rec.device not in devices:
            devices.append(rec.device)
        expected = context["data"]["n_images"]
        labels = rec.result["labels"]
        if rec.kind == "clean":
            if row.natural is None:
                row.natural = Cell(expected=expected)
            row.natural.add(sum(p == y for p, y in zip(rec.result["clean_pred"], labels)), len(labels))
            row.clean_seconds += rec.seconds
            continue
        label = rec.attack
        if label not in points:
            point_labels.append(label)
            points[label] = spec["attack"]
        pr = row.attacks.get(label)
        if pr is None:
            pr = row.attacks[label] = PointResult(point=spec["attack"], worst=Cell(expected=expected))
        robust = rec.result["robust"]
        for name, flags in robust.items():
            pr.per_label.setdefault(name, Cell(expected=expected)).add(sum(flags), len(flags))
        worst = [all(flags[i] for flags in robust.values()) for i in range(len(labels))]
        pr.worst.add(sum(worst), len(worst))
        pr.per_point.update(zip(rec.result["positions"], worst))
        pr.dynamic_warning |= bool(rec.result.get("notes", {}).get("dynamic_warning"))

    ordered = sorted(rows.values(), key=lambda r: (
        r.model, defense_order.index(r.defense) if r.defense in defense_order else len(defense_order), r.batch_size))
    notes = []
    if duplicates:
        notes.append(f"{duplicates} unit(s) were stored more than once across the merged stores; each counted once")
    for row in ordered:
        for name, cell in [("natural", row.natural)] + [(lbl, pr.worst) for lbl, pr in row.attacks.items()]:
            if cell is not None and not cell.complete:
                notes.append(f"partial: {row.model} / {row.defense} / {name}: {cell.n} of {cell.expected} images "
                             "evaluated (missing shards or an unfinished run)")
    return Summary(rows=ordered, point_labels=point_labels, points=points, devices=devices, notes=notes,
                   configs=configs)
