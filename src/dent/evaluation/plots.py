"""Figures of a report (matplotlib, Agg backend): the headline bars (natural accuracy, the paper's protocol
and the per-point worst case over every attack), accuracy vs epsilon (the paper's Figure 4), vs dent steps
(Tables 7 and 13), vs attack iterations (Table 10) and vs batch size (Table 9).

Every figure carries its settings (model, N images, attack, epsilon, steps, seed) in a caption, and every
accuracy its 95% Wilson interval as an error bar. Each defense has its own marker, marker size and line
style, so curves that coincide (static and dent at a large epsilon) stay visible. The data of each figure
comes from a ``*_series``/``*_panels`` function, which the tests check instead of pixels.
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dent.evaluation import security  # noqa: E402
from dent.evaluation.summary import Cell, Row, Summary, attack_description, sweep_curves  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class Series:
    """One curve: a row's accuracies along an axis, with the legend text."""

    row: Row
    name: str
    points: list[tuple[float, Cell]]
    attack: str = ""  # the attack (and threat) the curve is of; "" for natural accuracy


@dataclass
class HeadlinePanel:
    """One group of bars of the headline figure: per defense (column), each measure's accuracy."""

    title: str
    columns: list[str]
    bars: list[tuple[str, list[Optional[Cell]]]]  # (measure, one cell per column)


def _finish(fig, summary: Summary, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=11)
    width_chars = int(fig.get_figwidth() * 14.5)  # 7-point monospace: about 14.5 characters per inch
    caption = "\n".join(textwrap.wrap(summary.caption(), width_chars))
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", ha="left", family="monospace")
    n_lines = caption.count("\n") + 1
    fig.tight_layout(rect=(0, 0.03 + 0.025 * n_lines, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _eps_axis(norm: str, eps: float) -> float:
    return eps * 255 if norm == "Linf" else eps


def _percent_errors(cells: list[Optional[Cell]]) -> tuple[list[float], list[list[float]]]:
    """Heights (%) and asymmetric error bars (%, below/above) from the cells' 95% intervals; 0 for a missing cell."""
    heights, below, above = [], [], []
    for cell in cells:
        if cell is None or cell.n == 0:
            heights.append(0.0)
            below.append(0.0)
            above.append(0.0)
            continue
        low, high = cell.interval
        heights.append(100 * cell.accuracy)
        below.append(100 * (cell.accuracy - low))
        above.append(100 * (high - cell.accuracy))
    return heights, [below, above]


def defense_styles(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """A marker, marker size and line style per defense; earlier defenses get larger hollow markers, so a
    later defense's curve drawn on top of an earlier one leaves it visible."""
    names = list(dict.fromkeys(r.defense for r in rows))
    return {name: {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                   "markersize": max(9 - 1.5 * i, 4), "markerfacecolor": "none" if i % 2 == 0 else None}
            for i, name in enumerate(names)}


def _draw(ax, series: Series, style: dict[str, Any], color: Optional[str] = None, label: Optional[str] = None) -> None:
    points = [(x, c) for x, c in series.points if c is not None and c.n]
    if not points:
        return
    heights, errors = _percent_errors([c for _, c in points])
    ax.errorbar([x for x, _ in points], heights, yerr=errors, capsize=2, elinewidth=0.8, color=color,
                label=label or series.name, **style)


def _row_name(row: Row, summary: Summary) -> str:
    name = row.defense
    if len({r.model for r in summary.rows}) > 1:
        name = f"{row.model}: {name}"
    if len({r.batch_size for r in summary.rows}) > 1:
        name += f" (bs {row.batch_size})"
    return name


# -- headline ---------------------------------------------------------------------------------------
def headline_panels(summary: Summary) -> list[HeadlinePanel]:
    """Per model and threat: natural accuracy, the first attack of the security table (AutoAttack, the
    paper's protocol, where it ran) and, where several attacks ran, the per-point worst case over all of them.

    The first attack alone overstates a dynamic defense that a later attack breaks; the worst case is what a
    conclusion about its security rests on.
    """
    panels = []
    for table in security.security_tables(summary):
        clean, *attacks, worst = table.lines
        bars = [("natural", clean[1]), attacks[0]]
        if len(attacks) > 1:
            bars.append((f"worst case over all {len(attacks)} attacks (per point)", worst[1]))
        panels.append(HeadlinePanel(title=f"{table.model}, {table.threat}", columns=table.columns, bars=bars))
    if not panels and summary.rows:
        panels.append(HeadlinePanel(title="clean", columns=[_row_name(r, summary) for r in summary.rows],
                                    bars=[("natural", [r.natural for r in summary.rows])]))
    return panels


def plot_headline(summary: Summary, path: Path) -> Path:
    """Grouped bars per defense of each :func:`headline_panels` panel, with 95% intervals."""
    panels = headline_panels(summary)
    n_cols = min(len(panels), 3)
    n_rows = -(-len(panels) // n_cols)
    widest = max(len(p.columns) for p in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(6.0, 1.8 * widest + 2) * n_cols, 6.0 * n_rows),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        width = 0.8 / len(panel.bars)
        for i, (measure, cells) in enumerate(panel.bars):
            heights, errors = _percent_errors(cells)
            xs = [x + (i - (len(panel.bars) - 1) / 2) * width for x in range(len(panel.columns))]
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=_wrap_label(measure))
            for x, height, above, cell in zip(xs, heights, errors[1], cells):
                ax.text(x, height + above + 1.5, f"{height:.1f}" if cell is not None and cell.n else "-",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(panel.columns)), panel.columns, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 112)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(panel.title, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return _finish(fig, summary, "Natural accuracy, the paper's protocol and the worst case over every attack", path)


# -- accuracy vs epsilon ----------------------------------------------------------------------------
def eps_series(summary: Summary) -> dict[str, list[Series]]:
    """Per norm, one curve per row and attack: accuracy against epsilon, with epsilon 0 = natural accuracy.

    Different attacks are different curves (an attack run at one epsilon and another at a larger one are
    not a sweep of either). Where some attack of a norm was swept over epsilon, only the swept attacks are
    drawn; the others, one epsilon each, are in the headline figure and the security table.
    """
    out: dict[str, list[Series]] = defaultdict(list)
    for row in summary.rows:
        by_attack: dict[tuple[str, str], list[tuple[float, Cell]]] = defaultdict(list)
        for pr in row.attacks.values():
            norm = pr.point["norm"]
            by_attack[(norm, attack_description(pr.point))].append((_eps_axis(norm, pr.point["eps"]), pr.worst))
        for (norm, attack), points in by_attack.items():
            if row.natural is not None:
                points.append((0.0, row.natural))
            out[norm].append(Series(row=row, name=f"{_row_name(row, summary)}: {attack}", attack=attack,
                                    points=sorted(points, key=lambda p: p[0])))
    return {norm: _swept_if_any(series) for norm, series in out.items()}


def _swept_if_any(series: list[Series]) -> list[Series]:
    """The series with two or more attack epsilons (natural at 0 aside), or all when none has."""
    swept = [s for s in series if sum(x > 0 for x, _ in s.points) > 1]
    return swept or series


def plot_accuracy_vs_eps(summary: Summary, path: Path) -> Path:
    """Adversarial accuracy against the attack radius per defense and attack, epsilon 0 = natural (Figure 4)."""
    by_norm = eps_series(summary)
    styles = defense_styles(summary.rows)
    fig, axes = plt.subplots(1, len(by_norm), figsize=(11 * len(by_norm), 5.2), squeeze=False)
    for ax, (norm, series) in zip(axes[0], by_norm.items()):
        for s, color in zip(series, series_colors(series)):
            _draw(ax, s, styles[s.row.defense], color, label=_wrap_label(s.name))
        ax.set_xlabel("epsilon (x 1/255)" if norm == "Linf" else "epsilon (L2)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{norm} attacks")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _finish(fig, summary, "Accuracy vs attack radius (epsilon 0 = natural accuracy)", path)


def series_colors(series: list[Series]) -> list[str]:
    """A color per series: by attack where the curves are of several attacks (the defense is told by marker
    and line style), else by defense, so that coinciding curves of two defenses differ in color too."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several_attacks = len({s.attack for s in series}) > 1
    keys = [s.attack if several_attacks else s.row.defense for s in series]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return [cycle[index[key] % len(cycle)] for key in keys]


def _wrap_label(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 60))


def _legend(ax) -> None:
    """The legend beside the axes, so that it hides no curve."""
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def is_static(config: dict[str, Any]) -> bool:
    """No adaptation at all: 0 steps, training statistics, no input blur (the plain model)."""
    return int(config.get("steps", 0)) == 0 and config.get("stats") == "fixed" and config.get("input") == "none"


def defense_families(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by their defense config without ``steps`` (and by model, batch size).

    A family swept over steps (several step counts of its own) without a 0-step member borrows the static model's row (same model and batch size) as its
    0-step point, as the paper's step tables do (e.g. Table 13: 0 steps = the undefended model).
    """
    groups: dict[str, list[Row]] = defaultdict(list)
    keys: dict[str, dict] = {}
    for row in rows:
        cfg = {k: v for k, v in row.defense_config.items() if k != "steps"}
        key = json.dumps([row.model, row.batch_size, cfg], sort_keys=True)
        groups[key].append(row)
        keys[key] = cfg
    statics = {(r.model, r.batch_size): r for r in rows if is_static(r.defense_config)}
    for members in groups.values():
        anchor = statics.get((members[0].model, members[0].batch_size))
        if anchor is not None and all(r.steps > 0 for r in members) and len({r.steps for r in members}) > 1:
            members.append(anchor)
    # Name each family by the settings in which families differ.
    varying = sorted({k for a in keys.values() for b in keys.values() for k in a if a.get(k) != b.get(k)})
    named: dict[str, list[Row]] = {}
    for key, members in groups.items():
        cfg = keys[key]
        name = ", ".join(f"{k}={cfg[k]}" for k in varying if k in cfg) or "dent"
        if len({r.model for r in rows}) > 1:
            name = f"{members[0].model}: {name}"
        if len({r.batch_size for r in rows}) > 1:
            name += f" (bs {members[0].batch_size})"
        named[name] = sorted(members, key=lambda r: r.steps)
    return named


def swept_step_families(rows: list[Row]) -> dict[str, list[Row]]:
    """The :func:`defense_families` that were swept over dent steps (a single defense beside the static
    model is not a sweep)."""
    return {name: members for name, members in defense_families(rows).items() if len({r.steps for r in members}) > 1}


def steps_series(summary: Summary) -> list[Series]:
    """Per swept family: natural accuracy and each attack point's worst case against dent steps."""
    out = []
    for name, members in swept_step_families(summary.rows).items():
        out.append(Series(row=members[-1], name=f"{name}: natural", attack="",
                          points=[(r.steps, r.natural) for r in members if r.natural is not None]))
        for label in summary.point_labels:
            points = [(r.steps, r.attacks[label].worst) for r in members if label in r.attacks]
            if points:
                out.append(Series(row=members[-1], name=f"{name}: {label}", attack=label, points=points))
    return out


def _plot_curves(summary: Summary, series: list[Series], path: Path, title: str, xlabel: str, ylabel: str,
                 xscale: Optional[dict[str, Any]] = None) -> Path:
    """One axis of curves: color by attack, marker and line style by defense, 95% intervals as error bars."""
    fig, ax = plt.subplots(figsize=(11, 4.8))
    styles = defense_styles([s.row for s in series])
    for s, color in zip(series, series_colors(series)):
        _draw(ax, s, styles[s.row.defense], color, label=_wrap_label(s.name))
    if xscale:  # a log axis, ticked at the measured values
        ax.set_xscale(**xscale)
        xs = sorted({x for s in series for x, _ in s.points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _finish(fig, summary, title, path)


def plot_accuracy_vs_steps(summary: Summary, path: Path) -> Path:
    """Accuracy against dent's adaptation steps (Tables 7 and 13), natural accuracy included."""
    return _plot_curves(summary, steps_series(summary), path, "Accuracy vs adaptation steps", "dent steps",
                        "accuracy (%)")


def iteration_series(summary: Summary) -> list[Series]:
    """Per row, one curve per attack and threat swept over iteration counts (Table 10).

    Only points of the same attack at the same threat are joined: merged runs of different attacks at 10
    and 20 iterations are not a sweep. Attacks run at a single iteration count have no curve.
    """
    out = []
    for row in summary.rows:
        for curve in sweep_curves(row, "n_iter"):
            if len(curve) > 1:
                attack = security.curve_name(curve[0][1].point)
                out.append(Series(row=row, name=f"{_row_name(row, summary)}: {attack}", attack=attack,
                                  points=[(x, pr.worst) for x, pr in curve]))
    return out


def plot_accuracy_vs_iterations(summary: Summary, path: Path) -> Path:
    """Adversarial accuracy against attack iterations (Table 10), per defense, attack and threat."""
    return _plot_curves(summary, iteration_series(summary), path, "Accuracy vs attack iterations",
                        "attack iterations", "adversarial accuracy (%)", xscale={"value": "log"})


def batch_size_series(summary: Summary) -> list[Series]:
    """Per model and defense: natural accuracy and each attack point's worst case against the batch size."""
    by_defense: dict[str, list[Row]] = defaultdict(list)
    for row in summary.rows:
        by_defense[f"{row.model}: {row.defense}" if len({r.model for r in summary.rows}) > 1 else row.defense].append(row)
    out = []
    for name, rows in by_defense.items():
        rows = sorted(rows, key=lambda r: r.batch_size)
        out.append(Series(row=rows[0], name=f"{name}: natural", attack="",
                          points=[(r.batch_size, r.natural) for r in rows if r.natural is not None]))
        for label in summary.point_labels:
            points = [(r.batch_size, r.attacks[label].worst) for r in rows if label in r.attacks]
            if points:
                out.append(Series(row=rows[0], name=f"{name}: {label}", attack=label, points=points))
    return out


def plot_accuracy_vs_batch_size(summary: Summary, path: Path) -> Path:
    """Natural and adversarial accuracy against the defense batch size (Table 9)."""
    return _plot_curves(summary, batch_size_series(summary), path, "Accuracy vs batch size", "batch size",
                        "accuracy (%)", xscale={"value": "log", "base": 2})
