"""Security summary of a defense: the per-point worst case over every attack run on it, the security table,
and sanity checks that the attacks work.

* **Worst case.** A point counts as robust only if every attack run on the defense (every attack point of
  the same threat, every label within it: AutoAttack's, the adaptive attacks', each iteration count) left
  it correctly classified. It is computed over the points that every one of those attacks evaluated.
* **Security table** (per model and threat): clean accuracy, then accuracy under each attack (AutoAttack on
  the static model, the paper's protocol on dent, each adaptive attack), then the worst case; one column
  per defense.
* **Sanity checks** (the paper's Figure 4 and Table 10): along an epsilon sweep the accuracy must reach
  about 0 at the largest epsilon (and not rise with epsilon); along an iteration sweep it must stop
  dropping at the largest iteration counts. A curve that does not is flagged in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from dent.attacks.config import format_eps
from dent.evaluation.summary import Cell, Row, Summary, attack_description

#: Largest accuracy at the largest epsilon of a sweep that still counts as "about 0".
MAX_FINAL_ACCURACY = 0.05
#: Largest accuracy drop between the two largest iteration counts that counts as converged.
MAX_FINAL_DROP = 0.01
#: Largest accuracy rise from one epsilon to a larger one that is not flagged.
MAX_RISE = 0.01

#: Order of attack names in tables: the paper's protocol first, then the adaptive attacks.
ATTACK_ORDER = ("autoattack", "pgd", "transfer", "mixed", "through_adaptation", "bpda_eot", "surrogate_transfer")


# -- worst case -------------------------------------------------------------------------------------


def worst_case_flags(results: Mapping[str, Mapping[int, bool]]) -> dict[int, bool]:
    """Per point, robust under every attack: ``{attack: {point: robust}}`` -> ``{point: robust}``.

    Only points that every attack evaluated are included (a point one attack skipped has no worst case).
    """
    if not results:
        return {}
    per_attack = list(results.values())
    common = set(per_attack[0])
    for flags in per_attack[1:]:
        common &= set(flags)
    return {p: all(bool(flags[p]) for flags in per_attack) for p in sorted(common)}


def worst_case_cell(results: Mapping[str, Mapping[int, bool]], expected: int = 0) -> Cell:
    flags = worst_case_flags(results)
    return Cell(correct=sum(flags.values()), n=len(flags), expected=expected)


def threat_of(point: Mapping[str, Any]) -> str:
    return f"{point['norm']} {format_eps(point['eps'], point['norm'])}"


def row_worst_case(row: Row, threat: str) -> Optional[Cell]:
    """The per-point worst case over every attack point of ``row`` in ``threat`` (None if there is none)."""
    results = {label: pr.per_point for label, pr in row.attacks.items() if threat_of(pr.point) == threat}
    if not results:
        return None
    return worst_case_cell(results, expected=int(row.context["data"]["n_images"]))


# -- security table ---------------------------------------------------------------------------------


def _threats(summary: Summary) -> list[str]:
    out: list[str] = []
    for label in summary.point_labels:
        t = threat_of(summary.points[label])
        if t not in out:
            out.append(t)
    return out


def _attack_rank(point: Mapping[str, Any]) -> int:
    name = point["name"]
    return ATTACK_ORDER.index(name) if name in ATTACK_ORDER else len(ATTACK_ORDER)


def _attack_name(point: Mapping[str, Any]) -> str:
    text = attack_description(point)
    if point["name"] == "autoattack":
        text += " [paper protocol]"
    return text


@dataclass
class SecurityTable:
    model: str
    threat: str
    columns: list[str]  # defense (and batch size when several)
    lines: list[tuple[str, list[Optional[Cell]]]]  # (measure, one cell per column)


def security_tables(summary: Summary) -> list[SecurityTable]:
    """One table per model (and data context) and threat."""
    groups: dict[str, list[Row]] = {}
    for row in summary.rows:
        key = json.dumps(row.context, sort_keys=True)
        groups.setdefault(key, []).append(row)
    tables = []
    for rows in groups.values():
        several_sizes = len({r.batch_size for r in rows}) > 1
        columns = [r.defense + (f" (bs {r.batch_size})" if several_sizes else "") for r in rows]
        for threat in _threats(summary):
            labels = [label for label in summary.point_labels
                      if threat_of(summary.points[label]) == threat and any(label in r.attacks for r in rows)]
            if not labels:
                continue
            labels.sort(key=lambda label: _attack_rank(summary.points[label]))
            lines: list[tuple[str, list[Optional[Cell]]]] = [("clean", [r.natural for r in rows])]
            for label in labels:
                lines.append((_attack_name(summary.points[label]),
                              [r.attacks[label].worst if label in r.attacks else None for r in rows]))
            lines.append(("worst case over all attacks (per point)", [row_worst_case(r, threat) for r in rows]))
            tables.append(SecurityTable(model=rows[0].model, threat=threat, columns=columns, lines=lines))
    return tables


def _pct(cell: Optional[Cell]) -> str:
    if cell is None or cell.n == 0:
        return "-"
    text = f"{100 * cell.accuracy:.1f}"
    return text if cell.complete else f"{text}*"


def security_markdown(summary: Summary) -> Optional[str]:
    """The security tables in markdown; None when no attack was run."""
    tables = security_tables(summary)
    if not tables:
        return None
    parts = []
    for table in tables:
        header = ["Accuracy (%)"] + table.columns
        out = [f"{table.model}, {table.threat}:", "",
               "| " + " | ".join(header) + " |", "|---" + "|:---:" * len(table.columns) + "|"]
        for measure, cells in table.lines:
            out.append("| " + " | ".join([measure] + [_pct(c) for c in cells]) + " |")
        parts.append("\n".join(out))
    return "\n\n".join(parts)


# -- sanity checks ----------------------------------------------------------------------------------


@dataclass
class CurveCheck:
    """One swept curve of accuracy and its verdict."""

    row: str
    attack: str
    kind: str  # "epsilon" | "iterations"
    values: list[tuple[float, float]]  # (x, accuracy)
    ok: bool
    message: str


def check_eps_curve(curve: Iterable[tuple[float, float]], *, max_final: float = MAX_FINAL_ACCURACY,
                    max_rise: float = MAX_RISE, n: int = 0) -> tuple[bool, str]:
    """Accuracy vs epsilon must reach about 0 (<= ``max_final``) at the largest epsilon and not rise with it.

    ``n`` (points per accuracy) lets a rise of a single point pass on small evaluations.
    """
    values = sorted(curve)
    if len(values) < 2:
        return True, "fewer than 2 epsilons: not checked"
    problems = []
    tolerance = max(max_rise, 1.0 / n + 1e-9) if n else max_rise
    for (e0, a0), (e1, a1) in zip(values, values[1:]):
        if a1 - a0 > tolerance:
            problems.append(f"accuracy rises from {100 * a0:.1f}% to {100 * a1:.1f}% as epsilon grows "
                            f"({e0:.4g} -> {e1:.4g}): gradient masking or a failing attack")
    eps, acc = values[-1]
    if acc > max_final:
        problems.append(f"accuracy {100 * acc:.1f}% at the largest epsilon {eps:.4g} is not about 0 "
                        f"(> {100 * max_final:g}%): extend the sweep or the attack is not working")
    if problems:
        return False, "; ".join(problems)
    return True, f"reaches {100 * acc:.1f}% at epsilon {eps:.4g}"


def check_iteration_curve(curve: Iterable[tuple[float, float]], *, max_drop: float = MAX_FINAL_DROP,
                          n: int = 0) -> tuple[bool, str]:
    """Accuracy vs attack iterations must have converged: the drop between the two largest iteration counts
    is at most ``max_drop`` (or one point of ``n``)."""
    values = sorted(curve)
    if len(values) < 2:
        return True, "fewer than 2 iteration counts: not checked"
    (i0, a0), (i1, a1) = values[-2], values[-1]
    tolerance = max(max_drop, 1.0 / n + 1e-9) if n else max_drop
    if a0 - a1 > tolerance:
        return False, (f"still dropping at the largest iteration count: {100 * a0:.1f}% at {i0:g} -> "
                       f"{100 * a1:.1f}% at {i1:g} (> {100 * tolerance:.1f} points): more iterations needed")
    return True, f"converged: {100 * a0:.1f}% at {i0:g} -> {100 * a1:.1f}% at {i1:g}"


def _curve_key(point: Mapping[str, Any], drop: tuple[str, ...]) -> str:
    return json.dumps({k: v for k, v in point.items() if k not in drop}, sort_keys=True, default=str)


def sanity_checks(summary: Summary) -> list[CurveCheck]:
    """Check every epsilon sweep and iteration sweep found in the summary (worst-case accuracy per point)."""
    checks = []
    several_sizes = len({r.batch_size for r in summary.rows}) > 1
    for row in summary.rows:
        name = f"{row.model} / {row.defense}" + (f" / bs {row.batch_size}" if several_sizes else "")
        eps_curves: dict[str, list[tuple[float, Cell, dict]]] = {}
        iter_curves: dict[str, list[tuple[float, Cell, dict]]] = {}
        for pr in row.attacks.values():
            p = pr.point
            eps_curves.setdefault(_curve_key(p, ("eps",)), []).append((p["eps"], pr.worst, p))
            if p.get("n_iter") is not None:
                iter_curves.setdefault(_curve_key(p, ("n_iter",)), []).append((p["n_iter"], pr.worst, p))
        for kind, curves, check in (("epsilon", eps_curves, check_eps_curve),
                                    ("iterations", iter_curves, check_iteration_curve)):
            for entries in curves.values():
                if len({x for x, _, _ in entries}) < 2 or any(c.n == 0 for _, c, _ in entries):
                    continue
                values = sorted((x, c.accuracy) for x, c, _ in entries)
                n = min(c.n for _, c, _ in entries)
                ok, message = check(values, n=n)
                p = entries[0][2]
                if kind == "epsilon":
                    what = attack_description(p)
                else:
                    what = f"{attack_description({**p, 'n_iter': None})}, {threat_of(p)}"
                checks.append(CurveCheck(row=name, attack=what, kind=kind, values=values, ok=ok, message=message))
    return checks


def sanity_markdown(summary: Summary) -> Optional[str]:
    checks = sanity_checks(summary)
    if not checks:
        return None
    flagged = [c for c in checks if not c.ok]
    if not flagged:
        return f"All {len(checks)} swept curve(s) pass (details in results.json, key security.sanity_checks)."
    out = ["| defense | attack | sweep | accuracy (%) | problem |", "|---|---|---|---|---|"]
    for c in flagged:
        curve = ", ".join(f"{_x(c.kind, x)}: {100 * a:.1f}" for x, a in c.values)
        out.append(f"| {c.row} | {c.attack} | {c.kind} | {curve} | {c.message} |")
    head = (f"**{len(flagged)} of {len(checks)} swept curve(s) flagged**: the attack may not be working there "
            "(the others pass; all in results.json, key security.sanity_checks).")
    return head + "\n\n" + "\n".join(out)


def _x(kind: str, x: float) -> str:
    return f"{x:.4g}" if kind == "epsilon" else f"{x:g}"


def to_json(summary: Summary) -> dict[str, Any]:
    def cell(c: Optional[Cell]) -> Optional[dict[str, Any]]:
        if c is None:
            return None
        return {"correct": c.correct, "n": c.n, "expected": c.expected,
                "accuracy": None if c.n == 0 else round(c.accuracy, 6)}

    return {
        "tables": [
            {"model": t.model, "threat": t.threat, "columns": t.columns,
             "lines": [{"measure": m, "cells": [cell(c) for c in cells]} for m, cells in t.lines]}
            for t in security_tables(summary)
        ],
        "sanity_checks": [
            {"row": c.row, "attack": c.attack, "kind": c.kind, "values": c.values, "ok": c.ok, "message": c.message}
            for c in sanity_checks(summary)
        ],
    }
