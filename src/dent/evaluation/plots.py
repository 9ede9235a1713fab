"""Figures of a report (matplotlib, Agg backend): accuracy vs epsilon (the paper's Figure 4), vs dent
steps (Tables 7 and 13), vs attack iterations (Table 10), vs batch size (Table 9), and a bar chart.

Every figure carries its settings (model, N images, attack, epsilon, steps, seed) in a caption.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dent.attacks.config import format_eps  # noqa: E402
from dent.evaluation.summary import Row, Summary  # noqa: E402


def _pct(x: float) -> float:
    return 100.0 * x


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


def plot_bars(summary: Summary, path: Path) -> Path:
    """Natural and adversarial accuracy of each defense (first attack point of each model)."""
    rows = summary.rows
    labels = [f"{r.defense}" + (f"\n{r.model}" if len({x.model for x in rows}) > 1 else "")
              + (f"\nbs {r.batch_size}" if len({x.batch_size for x in rows}) > 1 else "") for r in rows]
    point = summary.point_labels[0] if summary.point_labels else None
    nat = [_pct(r.natural.accuracy) if r.natural else 0 for r in rows]
    adv = [_pct(r.attacks[point].worst.accuracy) if point in r.attacks else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) + 2), 4.8))
    xs = range(len(rows))
    width = 0.38
    b1 = ax.bar([x - width / 2 for x in xs], nat, width, label="natural")
    b2 = ax.bar([x + width / 2 for x in xs], adv, width, label=f"adversarial ({point})" if point else "adversarial")
    ax.bar_label(b1, fmt="%.1f", fontsize=8)
    ax.bar_label(b2, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 120)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return _finish(fig, summary, "Natural and adversarial accuracy", path)


def plot_accuracy_vs_eps(summary: Summary, path: Path) -> Path:
    """Adversarial accuracy against the attack radius per defense, with epsilon 0 = natural (Figure 4)."""
    norms = []
    for label in summary.point_labels:
        norm = summary.points[label]["norm"]
        if norm not in norms:
            norms.append(norm)
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4.8), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for row in summary.rows:
            by_iter: dict[Any, list[tuple[float, float]]] = defaultdict(list)
            for label, pr in row.attacks.items():
                if pr.point["norm"] != norm:
                    continue
                by_iter[pr.point.get("n_iter")].append((_eps_axis(norm, pr.point["eps"]), _pct(pr.worst.accuracy)))
            for n_iter, pts in by_iter.items():
                if row.natural is not None:
                    pts.append((0.0, _pct(row.natural.accuracy)))
                pts.sort()
                name = row.defense + (f" ({row.model})" if len({r.model for r in summary.rows}) > 1 else "")
                if len(by_iter) > 1:
                    name += f", {n_iter} iter"
                if len({r.batch_size for r in summary.rows}) > 1:
                    name += f", bs {row.batch_size}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("epsilon (x 1/255)" if norm == "Linf" else "epsilon (L2)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{norm} attacks")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, summary, "Accuracy vs attack radius (epsilon 0 = natural accuracy)", path)


def is_static(config: dict[str, Any]) -> bool:
    """No adaptation at all: 0 steps, training statistics, no input blur (the plain model)."""
    return int(config.get("steps", 0)) == 0 and config.get("stats") == "fixed" and config.get("input") == "none"


def defense_families(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by their defense config without ``steps`` (and by model, batch size).

    A family without a 0-step member borrows the static model's row (same model and batch size) as its
    0-step point, as the paper's step tables do (e.g. Table 13: 0 steps = the undefended model).
    """
    import json

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
        if anchor is not None and all(r.steps > 0 for r in members):
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


def plot_accuracy_vs_steps(summary: Summary, path: Path) -> Path:
    """Accuracy against dent's adaptation steps (Tables 7 and 13): adversarial solid, natural dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, members in defense_families(summary.rows).items():
        if len({r.steps for r in members}) < 2:
            continue
        for label in summary.point_labels:
            pts = [(r.steps, _pct(r.attacks[label].worst.accuracy)) for r in members if label in r.attacks]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}: {label}")
        nat = [(r.steps, _pct(r.natural.accuracy)) for r in members if r.natural is not None]
        if nat:
            ax.plot([p[0] for p in nat], [p[1] for p in nat], marker="s", linestyle="--", label=f"{name}: natural")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("dent steps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, summary, "Accuracy vs adaptation steps", path)


def plot_accuracy_vs_iterations(summary: Summary, path: Path) -> Path:
    """Adversarial accuracy against attack iterations (Table 10), per defense and threat."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for row in summary.rows:
        by_threat: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for pr in row.attacks.values():
            if pr.point.get("n_iter") is None:
                continue
            threat = f"{pr.point['norm']} {format_eps(pr.point['eps'], pr.point['norm'])}"
            by_threat[threat].append((pr.point["n_iter"], _pct(pr.worst.accuracy)))
        for threat, pts in by_threat.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{row.defense}: {threat}")
    ax.set_xscale("log")
    ax.set_xlabel("attack iterations")
    ax.set_ylabel("adversarial accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, summary, "Accuracy vs attack iterations", path)


def plot_accuracy_vs_batch_size(summary: Summary, path: Path) -> Path:
    """Natural (dashed) and adversarial (solid) accuracy against the defense batch size (Table 9)."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    by_defense: dict[str, list[Row]] = defaultdict(list)
    for row in summary.rows:
        by_defense[f"{row.model}: {row.defense}" if len({r.model for r in summary.rows}) > 1 else row.defense].append(row)
    for name, rows in by_defense.items():
        rows = sorted(rows, key=lambda r: r.batch_size)
        nat = [(r.batch_size, _pct(r.natural.accuracy)) for r in rows if r.natural is not None]
        if nat:
            ax.plot([p[0] for p in nat], [p[1] for p in nat], marker="s", linestyle="--", label=f"{name}: natural")
        for label in summary.point_labels:
            pts = [(r.batch_size, _pct(r.attacks[label].worst.accuracy)) for r in rows if label in r.attacks]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}: {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, summary, "Accuracy vs batch size", path)
