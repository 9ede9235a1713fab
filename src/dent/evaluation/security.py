"""Security summary of a defense: the per-point worst case over every attack run on it, the security table,
and sanity checks that the attacks work.

* **Worst case.** A point counts as robust only if every attack run on the defense (every attack point of
  the same threat, every label within it: AutoAttack's, the adaptive attacks', each iteration count) left
  it correctly classified. It is computed over the points that every one of those attacks evaluated.
* **Security table** (per model and threat): clean accuracy, then accuracy under each attack (AutoAttack on
  the static model, the paper's protocol on dent, each adaptive attack), then the worst case; one column
  per defense.
* **Sanity checks** (the paper's Figure 4 and Table 10): along an epsilon sweep the accuracy must reach
  about 0 at the largest epsilon (and not rise with epsilon); along an iteration sweep, and along a sweep of
  EOT samples (``attack.eot_iter``, merged runs), it must stop dropping at the largest counts. A curve that
  does not is flagged in the report, as is a defense whose plain input gradient is zero or not finite at
  some clean points (:mod:`dent.attacks.masking`: gradient masking, which fails the plain attacks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from dent.attacks.config import format_eps
from dent.evaluation.summary import (
    Cell, Row, Summary, attack_description, cell_fields, format_cell, sweep_curves, wilson_interval,
)

#: Largest accuracy at the largest epsilon of a sweep that still counts as "about 0".
MAX_FINAL_ACCURACY = 0.05
#: Largest accuracy drop between the two largest iteration counts that counts as converged.
MAX_FINAL_DROP = 0.01
#: Largest accuracy rise from one epsilon to a larger one that is not flagged.
MAX_RISE = 0.01

#: Order of attack names in tables: the paper's protocol first, then the adaptive attacks.
ATTACK_ORDER = ("autoattack", "pgd", "cw_l2", "transfer", "mixed", "through_adaptation", "bpda_eot",
                "surrogate_transfer", "batch_mates")


# -- worst case -------------------------------------------------------------------------------------


def worst_case_flags(results: Mapping[str, Mapping[Any, bool]]) -> dict[Any, bool]:
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


def worst_case_cell(results: Mapping[str, Mapping[tuple[int, int], bool]], expected: int = 0) -> Cell:
    """The worst case as a cell; points are ``(repeat, position)``, so each repeat keeps its own count."""
    cell = Cell(expected=expected)
    for (repeat, _), robust in worst_case_flags(results).items():
        cell.add(int(robust), 1, repeat)
    return cell


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
        text += " [standard: queries the defense; dent's paper protocol]"
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
            if any(r.natural_draws for r in rows):
                lines.append(("clean, mean (min-max) over draws of a randomized defense",
                              [r.natural_draws for r in rows]))
            for label in labels:
                lines.append((_attack_name(summary.points[label]),
                              [r.attacks[label].worst if label in r.attacks else None for r in rows]))
            lines.append(("worst case over all attacks (per point)", [row_worst_case(r, threat) for r in rows]))
            tables.append(SecurityTable(model=rows[0].model, threat=threat, columns=columns, lines=lines))
    return tables


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
            out.append("| " + " | ".join([measure] + [format_cell(c) for c in cells]) + " |")
        parts.append("\n".join(out))
    return "\n\n".join(parts)


# -- sanity checks ----------------------------------------------------------------------------------


@dataclass
class CurveCheck:
    """One check and its verdict: a swept curve of accuracy, or a defense's plain gradient (no curve)."""

    row: str
    attack: str
    kind: str  # "epsilon" | "iterations" | "EOT samples" | "gradient"
    values: list[tuple[float, float]]  # (x, accuracy)
    ok: bool
    message: str


def _acc_text(accuracy: float, n: int) -> str:
    """``46.9% [34.9, 59.2]`` (with its 95% interval when the number of points ``n`` is known)."""
    if not n:
        return f"{100 * accuracy:.1f}%"
    low, high = wilson_interval(round(accuracy * n), n)
    return f"{100 * accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _intervals_overlap(a0: float, a1: float, n: int) -> bool:
    """Whether the 95% intervals of two accuracies over ``n`` points overlap (the difference may be noise)."""
    if not n:
        return False
    low0, high0 = wilson_interval(round(a0 * n), n)
    low1, high1 = wilson_interval(round(a1 * n), n)
    return low0 <= high1 and low1 <= high0


def check_eps_curve(curve: Iterable[tuple[float, float]], *, max_final: float = MAX_FINAL_ACCURACY,
                    max_rise: float = MAX_RISE, n: int = 0) -> tuple[bool, str]:
    """Accuracy vs epsilon must reach about 0 (<= ``max_final``) at the largest epsilon and not rise with it.

    ``n`` (points per accuracy) lets a rise of a single point pass on small evaluations, and words a flag
    that the 95% intervals cannot confirm as such ("cannot tell"): the flag stays, since a pass would claim
    more than the data shows.
    """
    values = sorted(curve)
    if len(values) < 2:
        return True, "fewer than 2 epsilons: not checked"
    problems = []
    tolerance = max(max_rise, 1.0 / n + 1e-9) if n else max_rise
    for (e0, a0), (e1, a1) in zip(values, values[1:]):
        if a1 - a0 > tolerance:
            noise = " (within the 95% intervals: may be noise)" if _intervals_overlap(a0, a1, n) else ""
            problems.append(f"accuracy rises from {_acc_text(a0, n)} to {_acc_text(a1, n)} as epsilon grows "
                            f"({e0:.4g} -> {e1:.4g}){noise}: gradient masking or a failing attack")
    eps, acc = values[-1]
    if acc > max_final:
        low = wilson_interval(round(acc * n), n)[0] if n else acc
        verdict = "is not about 0" if low > max_final else "is not shown to be about 0 (its interval reaches it)"
        problems.append(f"accuracy {_acc_text(acc, n)} at the largest epsilon {eps:.4g} {verdict} "
                        f"(> {100 * max_final:g}%): extend the sweep or the attack is not working")
    if problems:
        return False, "; ".join(problems)
    return True, f"reaches {_acc_text(acc, n)} at epsilon {eps:.4g}"


def check_iteration_curve(curve: Iterable[tuple[float, float]], *, max_drop: float = MAX_FINAL_DROP,
                          n: int = 0, what: str = "iterations") -> tuple[bool, str]:
    """Accuracy vs attack iterations (or another budget, ``what``: e.g. EOT samples) must have converged: the
    drop between the two largest counts is at most ``max_drop`` (or one point of ``n``)."""
    values = sorted(curve)
    if len(values) < 2:
        return True, f"fewer than 2 counts of {what}: not checked"
    (i0, a0), (i1, a1) = values[-2], values[-1]
    tolerance = max(max_drop, 1.0 / n + 1e-9) if n else max_drop
    change = f"{_acc_text(a0, n)} at {i0:g} -> {_acc_text(a1, n)} at {i1:g}"
    if a0 - a1 > tolerance:
        if _intervals_overlap(a0, a1, n):
            return False, (f"not shown converged: {change} (> {100 * tolerance:.1f} points, but within the 95% "
                           f"intervals): more {what} (and images) needed to tell")
        return False, f"still dropping at the largest count of {what}: {change}: more {what} needed"
    return True, f"converged: {change}"


def curve_name(point: Mapping[str, Any], axis: str = "n_iter") -> str:
    """A budget curve's attack and threat, without the budget along it (``axis``: the iteration count)."""
    return f"{attack_description({**point, axis: None})}, {threat_of(point)}"


#: The swept curves the sanity checks look at: (kind, the attack point's field along the curve, the check).
SWEEPS = (
    ("epsilon", "eps", check_eps_curve),
    ("iterations", "n_iter", check_iteration_curve),
    ("EOT samples", "eot_iter", lambda values, n: check_iteration_curve(values, n=n, what="EOT samples")),
)


def sanity_checks(summary: Summary) -> list[CurveCheck]:
    """Check every epsilon, iteration and EOT-sample sweep found in the summary (worst-case accuracy per
    point), and every defense's plain gradient at its clean points."""
    checks = []
    several_sizes = len({r.batch_size for r in summary.rows}) > 1
    for row in summary.rows:
        name = f"{row.model} / {row.defense}" + (f" / bs {row.batch_size}" if several_sizes else "")
        gradient = gradient_check(row, name)
        checks += [gradient] if gradient is not None else []
        for kind, axis, check in SWEEPS:
            for curve in sweep_curves(row, axis):
                entries = [(x, pr.worst, pr.point) for x, pr in curve]
                if len(entries) < 2 or any(c.n == 0 for _, c, _ in entries):
                    continue
                values = [(x, c.accuracy) for x, c, _ in entries]
                n = min(c.n for _, c, _ in entries)
                ok, message = check(values, n=n)
                p = entries[0][2]
                what = attack_description(p) if kind == "epsilon" else curve_name(p, axis)
                checks.append(CurveCheck(row=name, attack=what, kind=kind, values=values, ok=ok, message=message))
    return checks


def gradient_check(row: Row, name: str) -> Optional[CurveCheck]:
    """Flags a defense whose plain input gradient was zero or not finite at some of its clean points."""
    counts = row.plain_gradient
    if not counts.get("n"):
        return None
    n, zero, nonfinite = counts["n"], counts.get("zero", 0), counts.get("nonfinite", 0)
    ok = zero == 0 and nonfinite == 0
    if ok:
        message = f"non-zero and finite at all {n} clean points"
    else:
        message = (f"zero at {zero} and not finite at {nonfinite} of {n} clean points: gradient masking; attacks "
                   "on the plain gradient fail there: trust BPDA (attack.name declared_apgd) or adaptive attacks")
    return CurveCheck(row=name, attack="plain input gradient of the cross-entropy", kind="gradient", values=[],
                      ok=ok, message=message)


def sanity_markdown(summary: Summary) -> Optional[str]:
    checks = sanity_checks(summary)
    if not checks:
        return None
    flagged = [c for c in checks if not c.ok]
    if not flagged:
        return f"All {len(checks)} check(s) pass (details in results.json, key security.sanity_checks)."
    out = ["| defense | attack | sweep | accuracy (%) | problem |", "|---|---|---|---|---|"]
    for c in flagged:
        curve = ", ".join(f"{_x(c.kind, x)}: {100 * a:.1f}" for x, a in c.values) or "-"
        out.append(f"| {c.row} | {c.attack} | {c.kind} | {curve} | {c.message} |")
    head = (f"**{len(flagged)} of {len(checks)} check(s) flagged**: the attack may not be working there "
            "(the others pass; all in results.json, key security.sanity_checks).")
    return head + "\n\n" + "\n".join(out)


def _x(kind: str, x: float) -> str:
    return f"{x:.4g}" if kind == "epsilon" else f"{x:g}"


def to_json(summary: Summary) -> dict[str, Any]:
    def cell(c: Optional[Cell]) -> Optional[dict[str, Any]]:
        return None if c is None else {**cell_fields(c), "expected": c.expected}

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
