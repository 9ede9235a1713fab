"""Aggregate stored per-point unit results into accuracies: the numbers behind every report.

Natural accuracy is the share of points the defense classifies correctly in clean batches. Robust
accuracy at an attack point is, per point, the worst case over every attack label stored for it (each
individually-run attack and/or the cumulative ensemble): a point counts as robust only if it withstood
all of them. Per-label accuracies (the paper's Table 2) are kept beside it.

Every accuracy is a count of correct points out of N, so it carries a 95% Wilson score interval over the
N images: with 64 images, one image is 1.6 points and the interval around 90% spans about 15 points, so
float-level differences between machines (which flip single images) stay inside it. Where an evaluation
repeats (``spec["repeat"]``: other attack seeds, possibly other subsets), a cell pools every repeat's
points and keeps each repeat's count for the mean, min and max over repeats.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Optional

from dent.attacks.config import format_eps
from dent.evaluation.store import UnitRecord

WORST = "worst case"

#: The standard normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95% by default); (nan, nan) when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n correct, which
    matters for robust accuracies near 0 on a few dozen images.
    """
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class RepeatSpread:
    """Accuracy over the repeats of an evaluation: their mean, min and max (``count`` repeats)."""

    mean: float
    min: float
    max: float
    count: int


@dataclass
class Cell:
    """A count of correct points out of ``n``, pooled over repeats (``expected``: N images per repeat)."""

    correct: int = 0
    n: int = 0
    expected: int = 0
    by_repeat: dict[Hashable, list[int]] = field(default_factory=dict)  # repeat -> [correct, n]
    # Draws of a randomized defense's prediction on the same points (by_repeat: one entry per repeat and draw):
    # they are not independent images, so the cell shows their mean and spread, not a pooled interval.
    draws: bool = False

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the pooled accuracy."""
        return wilson_interval(self.correct, self.n)

    @property
    def complete(self) -> bool:
        return self.n >= self.expected and all(n >= self.expected for _, n in self.by_repeat.values())

    @property
    def spread(self) -> Optional[RepeatSpread]:
        """Mean, min and max accuracy over the repeats; None for a single repeat."""
        accuracies = [c / n for c, n in self.by_repeat.values() if n]
        if len(accuracies) < 2:
            return None
        return RepeatSpread(statistics.fmean(accuracies), min(accuracies), max(accuracies), len(accuracies))

    def add(self, correct: int, n: int, repeat: Hashable = 0) -> None:
        self.correct += correct
        self.n += n
        counts = self.by_repeat.setdefault(repeat, [0, 0])
        counts[0] += correct
        counts[1] += n


def format_cell(cell: Optional[Cell]) -> str:
    """``90.6 [81.0, 95.6]``: accuracy (%) and its 95% interval; with repeats ``(min-max)`` over them follows,
    and ``*`` marks a cell computed on fewer than N images."""
    if cell is None or cell.n == 0:
        return "-"
    spread = cell.spread
    if cell.draws and spread is not None:
        text = f"{100 * spread.mean:.1f}"  # draws of the same images: their mean and spread, no interval
    else:
        low, high = cell.interval
        text = f"{100 * cell.accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    if spread is not None:
        text += f" ({100 * spread.min:.1f}-{100 * spread.max:.1f})"
    return text if cell.complete else f"{text}*"


def cell_fields(cell: Cell) -> dict[str, Any]:
    """A cell's numbers for CSV and JSON: counts, accuracy, interval bounds and the spread over repeats."""
    low, high = cell.interval
    spread = cell.spread
    return {
        "correct": cell.correct, "n": cell.n,
        "accuracy": None if cell.n == 0 else round(cell.accuracy, 6),
        "ci_low": None if cell.n == 0 else round(low, 6), "ci_high": None if cell.n == 0 else round(high, 6),
        "repeats": max(len(cell.by_repeat), 1),
        "draws": cell.draws,
        "repeat_mean": None if spread is None else round(spread.mean, 6),
        "repeat_min": None if spread is None else round(spread.min, 6),
        "repeat_max": None if spread is None else round(spread.max, 6),
    }


@dataclass
class PointResult:
    point: dict[str, Any]  # the attack point's fields
    worst: Cell
    per_label: dict[str, Cell] = field(default_factory=dict)
    dynamic_warning: bool = False
    per_point: dict[tuple[int, int], bool] = field(default_factory=dict)  # (repeat, position) -> robust under every label
    # A detecting defense (notes.detection): per attacked input, its reject margin (> 0: rejected) and whether
    # the classifier's own label is wrong there (the input fools the classifier, rejected or not).
    detection: list[tuple[float, bool]] = field(default_factory=list)


@dataclass
class Row:
    """One model x defense x batch size."""

    model: str
    context: dict[str, Any]
    defense: str
    defense_config: dict[str, Any]
    batch_size: int
    identity: Optional[dict[str, Any]] = None  # what was evaluated, from the store's metadata (newer stores)
    natural: Optional[Cell] = None
    natural_draws: Optional[Cell] = None  # a randomized defense's clean accuracy over several draws
    clean_times: list[float] = field(default_factory=list)  # seconds per image of each clean unit (one call)
    attacks: dict[str, PointResult] = field(default_factory=dict)  # point label -> result
    # Clean points whose plain input gradient was zero / not finite, of those checked (dent.attacks.masking;
    # stores written before the check have none).
    plain_gradient: dict[str, int] = field(default_factory=dict)
    clean_reject_margins: list[float] = field(default_factory=list)  # a detecting defense's, on the clean inputs

    @property
    def steps(self) -> int:
        """Adaptation steps per call: dent's, those of the dent stages of a pipeline, 0 for other kinds."""
        return adaptation_steps(self.defense_config)


def _add_clean_draws(row: Row, result: Mapping[str, Any], expected: int, repeat: int) -> None:
    draws = result.get("notes", {}).get("clean_draws")
    if not draws:
        return
    if row.natural_draws is None:
        row.natural_draws = Cell(expected=expected, draws=True)
    for d, pred in enumerate(draws):
        row.natural_draws.add(sum(p == y for p, y in zip(pred, result["labels"])), len(pred), (repeat, d))


def adaptation_steps(defense_config: Mapping[str, Any]) -> int:
    stages = defense_config.get("stages") if defense_config.get("kind") == "pipeline" else None
    if stages is not None:
        return sum(adaptation_steps(stage) for stage in stages)
    return int(defense_config.get("steps", 0)) if defense_config.get("kind", "dent") == "dent" else 0


@dataclass
class RunSource:
    """One merged run: its path, the machine it ran on (``provenance.json``), the model and data it evaluated
    (the store's ``identity`` metadata, absent in older stores) and the keys of its units."""

    path: str
    provenance: Optional[dict[str, Any]] = None
    identity: Optional[dict[str, Any]] = None
    keys: frozenset[str] = frozenset()


def machine_text(provenance: Optional[Mapping[str, Any]]) -> str:
    """What changes numerics on a run's machine, in one line: CPU model and capability, threads, device, torch."""
    if not provenance:
        return "machine not recorded (no provenance.json)"
    machine = provenance.get("machine", {})
    numerics = provenance.get("numerics", {})
    cpu = numerics.get("cpu_model") or machine.get("processor") or "unknown CPU"
    parts = [cpu, f"CPU capability {numerics.get('cpu_capability', 'not recorded')}"]
    threads = numerics.get("intra_op_threads", machine.get("cpu_threads"))
    if threads is not None:
        parts.append(f"{threads} thread(s)")
    if numerics.get("device_name"):
        parts.append(f"device {numerics['device_name']}")
    elif machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']}")
    torch_version = numerics.get("torch") or provenance.get("versions", {}).get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    if numerics.get("onednn"):
        parts.append(f"oneDNN {numerics['onednn']}")
    if "deterministic_algorithms" in numerics:
        parts.append(f"deterministic algorithms {'on' if numerics['deterministic_algorithms'] else 'off'}")
    return ", ".join(parts)


def machines(sources: Iterable[RunSource]) -> dict[str, list[str]]:
    """Machine description -> the runs that ran there (merged stores may come from several machines)."""
    out: dict[str, list[str]] = {}
    for source in sources:
        out.setdefault(machine_text(source.provenance), []).append(source.path)
    return out


def _digest(identity: Optional[Mapping[str, Any]], what: str) -> Optional[str]:
    part = (identity or {}).get(what) or {}
    return part.get("digest") if isinstance(part, Mapping) else None


def _measured(identity: Optional[Mapping[str, Any]]) -> bool:
    return any(_digest(identity, what) for what in ("model", "data"))


def model_name(context_model: Mapping[str, Any], identity: Optional[Mapping[str, Any]]) -> str:
    """The evaluated model's name: the store's identity where recorded (a custom model passed to ``evaluate``
    is not the config's ``model.arch``), else the config's architecture."""
    model = (identity or {}).get("model")
    if isinstance(model, Mapping) and (model.get("arch") or model.get("name")):
        return str(model.get("arch") or model.get("name"))
    return str(context_model["arch"])


@dataclass
class Summary:
    rows: list[Row]
    point_labels: list[str]  # in order of first appearance
    points: dict[str, dict[str, Any]]
    devices: list[str]
    notes: list[str]
    configs: list[dict[str, Any]] = field(default_factory=list)
    sources: list["RunSource"] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """What every table and figure must state: model, N images, attack, epsilon, steps, seed."""
        contexts = {json.dumps(r.context, sort_keys=True): r.context for r in self.rows}.values()
        models = sorted({r.model + (f" (digest {d})" if (d := _digest(r.identity, "model")) else "")
                         for r in self.rows})
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
        data += sorted({f"data digest {d}" for r in self.rows if (d := _digest(r.identity, "data"))})
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
            "repeats": sorted({len(cell.by_repeat) for r in self.rows for cell in _cells(r) if cell.by_repeat}),
            "devices": self.devices,
            "machines": machines(self.sources),
        }

    def caption(self) -> str:
        s = self.settings()
        n = "/".join(str(v) for v in s["n_images"])
        steps = ", ".join(f"{name} {k}" for name, k in s["steps"].items())
        repeats = "/".join(str(r) for r in s["repeats"] if r > 1)
        return (
            f"model: {', '.join(s['models'])} | N={n} images, {', '.join(s['data'])} | "
            f"attack: {'; '.join(s['attacks'])} | eps: {', '.join(s['threats'])} | steps: {steps} | "
            f"batch size: {', '.join(map(str, s['batch_sizes']))} | seed: {', '.join(map(str, s['seeds']))}"
            + (f" | {repeats} repeats" if repeats else "") + " | bars: 95% Wilson intervals"
        )


def _cells(row: Row) -> Iterable[Cell]:
    if row.natural is not None:
        yield row.natural
    for pr in row.attacks.values():
        yield pr.worst


def sweep_curves(row: Row, axis: str) -> list[list[tuple[float, PointResult]]]:
    """The row's attack points joined into curves along ``axis`` (``"eps"`` or ``"n_iter"``).

    A curve joins only points that agree on every other field (attack, budget, threat), so two different
    attacks at 10 and 20 iterations are two curves, not one. Each curve is sorted along ``axis``; curves of
    a single point are included (callers decide whether one point is a sweep).
    """
    curves: dict[str, list[tuple[float, PointResult]]] = {}
    for pr in row.attacks.values():
        if pr.point.get(axis) is None:
            continue
        rest = json.dumps({k: v for k, v in pr.point.items() if k != axis}, sort_keys=True, default=str)
        curves.setdefault(rest, []).append((pr.point[axis], pr))
    return [sorted(curve, key=lambda entry: entry[0]) for curve in curves.values()]


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
        if point["name"] == "pgd" and point.get("n_restarts"):
            out += f", {point['n_restarts']} restarts"
        if point.get("loss", "ce") != "ce":
            out += f", {point['loss']} loss"
        if point.get("gradient", "plain") != "plain":
            out += ", BPDA/EOT gradient as the defense declares"
        if point.get("cw") is not None:
            cw = point["cw"]
            out += f", {cw['search_steps']} search steps from c {cw['initial_const']:g}, Adam lr {cw['lr']:g}"
            if cw["confidence"]:
                out += f", kappa {cw['confidence']:g}"
    budget = []
    for key, name in (("n_iter", "iter"), ("n_target_classes", "targets"), ("n_queries", "queries"),
                      ("n_restarts", "restarts"), ("eot_iter", "EOT")):
        if point.get(key) is not None and not (key == "n_restarts" and point["name"] == "pgd"):
            budget.append(f"{point[key]} {name}")
    if budget:
        out += ", " + ", ".join(budget)
    return out


def row_context(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What puts two units in one row besides defense and batch size: the model, the data and the seed.

    The repeat index is not part of it, so the repeats of an evaluation pool into one row: a later repeat is
    placed by the seeds of repeat 0 (``spec["repeat_of"]``, see :func:`dent.evaluation.units.repeat_context`).
    """
    base = spec.get("repeat_of")
    if base is None:
        return {k: spec[k] for k in ("model", "data", "seed")}
    return {"model": spec["model"], "data": {**spec["data"], "subset_seed": base["subset_seed"]}, "seed": base["seed"]}


def _distinct_label(label: str, attack: Mapping[str, Any], points: Mapping[str, Mapping[str, Any]]) -> str:
    """The stored label, or, where merged runs used it for another setting of the attack (e.g. ``eot_iter``, which
    labels do not show), the label followed by the settings that differ from the first one's."""
    first = points.get(label)
    if first is None:
        return label
    differ = [k for k in attack if k in first and attack[k] != first[k]]
    return label if not differ else label + " " + " ".join(f"{k}={attack[k]}" for k in differ)


def summarize(records: Iterable[UnitRecord], configs: Iterable[dict[str, Any]] = (), duplicates: int = 0,
              sources: Iterable[RunSource] = ()) -> Summary:
    configs = list(configs)
    sources = list(sources)
    # Only an identity with a digest (a model or data passed in) says more than the unit's own config does; a
    # by-name identity (newer stores) and none (older ones) are the same evaluation, one row.
    identity_of = {key: source.identity for source in sources if _measured(source.identity) for key in source.keys}
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
        context = row_context(spec)
        repeat = int(spec.get("repeat") or 0)
        identity = identity_of.get(rec.key)
        dcfg = spec["defense_config"]
        key = (json.dumps(context, sort_keys=True), json.dumps(identity, sort_keys=True), rec.defense,
               json.dumps(dcfg, sort_keys=True), rec.batch_size)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(model=model_name(context["model"], identity), context=context, defense=rec.defense,
                                  defense_config=dcfg, batch_size=rec.batch_size, identity=identity)
        if rec.device not in devices:
            devices.append(rec.device)
        expected = context["data"]["n_images"]
        labels = rec.result["labels"]
        if rec.kind == "clean":
            if row.natural is None:
                row.natural = Cell(expected=expected)
            row.natural.add(sum(p == y for p, y in zip(rec.result["clean_pred"], labels)), len(labels), repeat)
            _add_clean_draws(row, rec.result, expected, repeat)
            row.clean_reject_margins += rec.result.get("notes", {}).get("detection", {}).get("reject_margin", [])
            for count, value in rec.result.get("notes", {}).get("plain_gradient", {}).items():
                row.plain_gradient[count] = row.plain_gradient.get(count, 0) + value
            if labels:
                row.clean_times.append(rec.seconds / len(labels))
            continue
        label = _distinct_label(rec.attack, spec["attack"], points)
        if label not in points:
            point_labels.append(label)
            points[label] = spec["attack"]
        pr = row.attacks.get(label)
        if pr is None:
            pr = row.attacks[label] = PointResult(point=spec["attack"], worst=Cell(expected=expected))
        robust = rec.result["robust"]
        for name, flags in robust.items():
            pr.per_label.setdefault(name, Cell(expected=expected)).add(sum(flags), len(flags), repeat)
        worst = [all(flags[i] for flags in robust.values()) for i in range(len(labels))]
        pr.worst.add(sum(worst), len(worst), repeat)
        pr.per_point.update(((repeat, position), flag) for position, flag in zip(rec.result["positions"], worst))
        pr.dynamic_warning |= bool(rec.result.get("notes", {}).get("dynamic_warning"))
        detection = rec.result.get("notes", {}).get("detection")
        if detection:
            pr.detection += [(margin, classified != y) for margin, classified, y in
                             zip(detection["reject_margin"], detection["classified"], labels)]

    ordered = sorted(rows.values(), key=lambda r: (
        r.model, defense_order.index(r.defense) if r.defense in defense_order else len(defense_order), r.batch_size))
    notes = []
    if duplicates:
        notes.append(f"{duplicates} unit(s) were stored more than once across the merged stores; each counted once")
    for row in ordered:
        for name, cell in [("natural", row.natural)] + [(lbl, pr.worst) for lbl, pr in row.attacks.items()]:
            if cell is not None and not cell.complete:
                wanted = cell.expected * max(len(cell.by_repeat), 1)
                notes.append(f"partial: {row.model} / {row.defense} / {name}: {cell.n} of {wanted} images "
                             "evaluated (missing shards or an unfinished run)")
    return Summary(rows=ordered, point_labels=point_labels, points=points, devices=devices, notes=notes,
                   configs=configs, sources=sources)
