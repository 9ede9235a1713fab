"""Reports of one or more runs: markdown tables in the paper's format, CSV, JSON and PNG figures.

``write_report(paths, out_dir)`` reads the stores of the given run directories (or store files), merges
their units by key (shards of one config, or runs of several models), and writes

* ``report.md``: the main table (Natural and Adversarial accuracy per defense, as the paper's Table 1),
  per-attack accuracy with the worst case (Table 2), and where the runs sweep them, tables over dent
  steps (Tables 7, 13), batch size (Table 9), attack iterations (Table 10) and epsilon (Figure 4);
* ``results.csv`` (one row per model x defense x batch size x measure) and ``results.json``;
* ``accuracy.png`` (the headline: natural accuracy, the paper's protocol and the per-point worst case over
  every attack) and ``accuracy_vs_eps.png``, and where swept ``accuracy_vs_steps.png``,
  ``accuracy_vs_iterations.png``, ``accuracy_vs_batch_size.png``.

Every accuracy carries its 95% Wilson interval over the N images (markdown ``90.6 [81.0, 95.6]``, CSV and
JSON ``ci_low``/``ci_high``, error bars in the figures) and, where the runs repeat, the range over repeats.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from dent.attacks.config import format_eps
import torch

from dent.errors import DentError
from dent.evaluation import plots, security
from dent.evaluation.detection import roc_auc, roc_auc_interval, tpr_at_fpr
from dent.evaluation.rundir import find_store, load_run_config
from dent.evaluation.store import ResultStore, read_records
from dent.evaluation.summary import (
    WORST, Cell, Row, RunSource, Summary, attack_description, cell_fields, format_cell, summarize,
)
from dent.outputs import output_dir

PROVENANCE_NAME = "provenance.json"


@dataclass
class ReportFiles:
    out_dir: Path
    markdown: Path
    csv: Path
    json: Path
    figures: list[Path] = field(default_factory=list)
    text: str = ""


def load_summary(paths: Iterable[str | Path]) -> Summary:
    """Merge the units of several run directories (or store files) into one :class:`Summary`."""
    paths = list(paths)
    stores = [find_store(p) for p in paths]
    configs = []
    for p in paths:
        try:
            configs.append(load_run_config(p))
        except DentError:  # a bare store file without a config still reports, without defense order
            pass
    records, duplicates = read_records(stores)
    return summarize(records, configs, duplicates, sources=[run_source(p, store) for p, store in zip(paths, stores)])


def run_source(path: str | Path, store_path: Path) -> RunSource:
    """A merged run's machine (its ``provenance.json``, if any) and evaluated identity (store metadata)."""
    provenance_path = store_path.parent / PROVENANCE_NAME
    try:
        provenance = json.loads(provenance_path.read_text())
    except (OSError, ValueError):  # no provenance (a bare store) or an unreadable one: reported as not recorded
        provenance = None
    with ResultStore(store_path, create=False) as store:
        identity = store.get_meta("identity")
        keys = frozenset(store.done_keys())
    return RunSource(path=Path(path).name or str(path), provenance=provenance, identity=identity, keys=keys)


# -- formatting -------------------------------------------------------------------------------------

INTERVAL_NOTE = (
    "`x [low, high]`: accuracy (%) and its 95% Wilson score interval over the evaluated images; differences "
    "inside overlapping intervals are not evidence of a difference (with 64 images one image is 1.6 points)"
)
REPEATS_NOTE = (
    "`(min-max)`: the range of the accuracy over the repeats of the evaluation (other attack seeds, possibly "
    "other subsets); the accuracy and interval pool every repeat's points, so the accuracy is the mean over "
    "repeats when each repeat covers its N images. Repeats on the same images are not independent samples of "
    "images: the pooled interval is then narrower than the uncertainty about other images"
)

def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else ":---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _multi(values: Iterable[Any]) -> bool:
    return len(set(values)) > 1


def _row_label(row: Row, summary: Summary, with_defense: bool = False) -> str:
    parts = [row.model]
    if with_defense:
        parts.append(row.defense)
    if _multi(r.batch_size for r in summary.rows):
        parts.append(f"bs {row.batch_size}")
    return " / ".join(parts)


def _columns(summary: Summary) -> dict[int, str]:
    """Each row's defense column (by ``id(row)``): its name, plus its settings when merged runs use one name for
    several settings (e.g. an fp32 and a bf16 run), so that no column stands for two defenses."""
    settings: dict[str, set[str]] = defaultdict(set)
    for row in summary.rows:
        settings[row.defense].add(json.dumps(row.defense_config, sort_keys=True))
    return {id(row): row.defense if len(settings[row.defense]) == 1
            else f"{row.defense} ({_defense_text(row.defense_config)})" for row in summary.rows}


def main_table(summary: Summary) -> str:
    """The paper's format: Natural and Adversarial accuracy, one column per defense."""
    column = _columns(summary)
    defenses = list(dict.fromkeys(column.values()))
    groups: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in summary.rows:
        groups[(row.model, json.dumps(row.context, sort_keys=True), row.batch_size)][column[id(row)]] = row
    header = ["Accuracy (%)"] + [f"Natural {d}" for d in defenses]
    header += [f"Adversarial {d}" for d in defenses] if summary.point_labels else []
    lines: list[list[str]] = []
    labels = summary.point_labels or [None]
    for label in labels:
        if label is not None and len(labels) > 1:
            lines.append([f"*{label}*"] + [""] * (len(header) - 1))
        for _, by_def in groups.items():
            first = next(iter(by_def.values()))
            line = [_row_label(first, summary)]
            line += [format_cell(by_def[d].natural) if d in by_def else "-" for d in defenses]
            if label is not None:
                line += [format_cell(by_def[d].attacks.get(label).worst) if d in by_def and label in by_def[d].attacks else "-"
                         for d in defenses]
            lines.append(line)
    return _table(header, lines)


TIME_CAPTION = (
    "ms / image: the median over the defense's clean units (one defended call per batch) of the unit's time "
    "per image, so that the slower first call of a process (allocation, lazy initialization) does not set it; "
    "with one or two units (units column) that warm-up is still part of it."
)


def time_table(summary: Summary) -> Optional[str]:
    """Milliseconds per image of a defended prediction, relative to the static model (the paper's Table 4 TIME)."""
    rows = [r for r in summary.rows if r.clean_times and sum(r.clean_times) > 0]
    if len({r.defense for r in rows}) < 2:
        return None
    statics = {(r.model, r.batch_size): r for r in rows if plots.is_static(r.defense_config)}
    header = ["Defense", "steps", "units", "ms / image", "x static"]
    lines = []
    for r in rows:
        per_image = statistics.median(r.clean_times)
        base = statics.get((r.model, r.batch_size))
        rel = f"{per_image / statistics.median(base.clean_times):.1f}x" if base is not None else "-"
        lines.append([_row_label(r, summary, with_defense=True), str(r.steps), str(len(r.clean_times)),
                      f"{1000 * per_image:.1f}", rel])
    return _table(header, lines) + "\n\n" + TIME_CAPTION


def per_attack_table(summary: Summary) -> Optional[str]:
    """Accuracy under each attack and the per-point worst case over them (Table 2)."""
    label_names: list[str] = []
    for row in summary.rows:
        for pr in row.attacks.values():
            for name in pr.per_label:
                if name not in label_names:
                    label_names.append(name)
    if label_names in (["ensemble"], ["pgd"], ["cw_l2"]) or not label_names:
        return None
    ordered = [n for n in label_names if n != "ensemble"] + (["ensemble"] if "ensemble" in label_names else [])
    header = ["Accuracy (%)", "attack point"] + ordered + [WORST]
    lines = []
    for row in summary.rows:
        for label, pr in row.attacks.items():
            lines.append([_row_label(row, summary, with_defense=True), label]
                         + [format_cell(pr.per_label.get(n)) for n in ordered] + [format_cell(pr.worst)])
    return _table(header, lines)


#: The clean false-positive rate of the detection table's true-positive rate.
DETECTION_FPR = 0.05


def detection_rows(summary: Summary) -> list[dict[str, Any]]:
    """Per detecting defense and attack point (units with ``notes.detection``): clean and adversarial inputs
    rejected, and how well the reject margin tells the attack's inputs that fool the classifier from the clean
    ones: ROC AUC and the true-positive rate at :data:`DETECTION_FPR` on these clean inputs (with its interval)."""
    out = []
    for row in summary.rows:
        clean = row.clean_reject_margins
        for label, pr in row.attacks.items():
            if not pr.detection or not clean:
                continue
            fooled = [margin for margin, wrong in pr.detection if wrong]
            tpr = tpr_at_fpr(torch.tensor(clean), torch.tensor(fooled), DETECTION_FPR) if fooled else None
            auc = roc_auc(torch.tensor(clean), torch.tensor(fooled)) if fooled else None
            out.append({
                "model": row.model, "defense": row.defense, "attack": label,
                "clean_rejected": sum(m > 0 for m in clean), "n_clean": len(clean),
                "adversarial_rejected": sum(m > 0 for m, _ in pr.detection), "n_adversarial": len(pr.detection),
                "n_fooled": len(fooled), "fooled_rejected": sum(m > 0 for m in fooled), "roc_auc": auc,
                "roc_auc_interval": None if auc is None else list(roc_auc_interval(auc, len(clean), len(fooled))),
                "tpr": None if tpr is None else {"count": tpr.count, "n": tpr.n, "interval": list(tpr.interval)},
            })
    return out


def detection_table(summary: Summary) -> Optional[str]:
    """:func:`detection_rows` as markdown."""
    rows = detection_rows(summary)
    if not rows:
        return None
    header = ["defense", "attack point", "clean rejected", "adversarial rejected", "fooling the classifier",
              "of those rejected", "ROC AUC [95%]", f"TPR at {100 * DETECTION_FPR:g}% FPR (%)"]
    lines = []
    for r in rows:
        tpr = r["tpr"]
        tpr_text = "n/a" if tpr is None else (f"{100 * tpr['count'] / tpr['n']:.1f} [{100 * tpr['interval'][0]:.1f}, "
                                              f"{100 * tpr['interval'][1]:.1f}]")
        lines.append([f"{r['model']} / {r['defense']}", r["attack"], f"{r['clean_rejected']}/{r['n_clean']}",
                      f"{r['adversarial_rejected']}/{r['n_adversarial']}", str(r["n_fooled"]), str(r["fooled_rejected"]),
                      "n/a" if r["roc_auc"] is None else
                      f"{r['roc_auc']:.3f} [{r['roc_auc_interval'][0]:.3f}, {r['roc_auc_interval'][1]:.3f}]", tpr_text])
    return _table(header, lines)


def steps_table(summary: Summary) -> Optional[str]:
    families = plots.swept_step_families(summary.rows)
    if not families:
        return None
    steps = sorted({r.steps for rows in families.values() for r in rows})
    header = ["Accuracy (%)", "measure"] + [f"{s} steps" for s in steps]
    lines = []
    for name, rows in families.items():
        by_steps = {r.steps: r for r in rows}
        measures = [("natural", lambda r: r.natural)]
        measures += [(label, lambda r, label=label: r.attacks[label].worst if label in r.attacks else None)
                     for label in summary.point_labels]
        for measure, get in measures:
            cells = [format_cell(get(by_steps[s])) if s in by_steps else "" for s in steps]
            if any(c not in ("", "-") for c in cells):
                lines.append([name, measure] + cells)
    return _table(header, lines)


def batch_size_table(summary: Summary) -> Optional[str]:
    sizes = sorted({r.batch_size for r in summary.rows})
    if len(sizes) < 2:
        return None
    header = ["Accuracy (%)", "measure"] + [str(s) for s in sizes]
    lines = []
    groups: dict[tuple, dict[int, Row]] = defaultdict(dict)
    for row in summary.rows:
        groups[(row.model, row.defense)][row.batch_size] = row
    for (model, defense), by_size in groups.items():
        name = f"{model} / {defense}" if _multi(r.model for r in summary.rows) else defense
        lines.append([name, "natural"] + [format_cell(by_size[s].natural) if s in by_size else "" for s in sizes])
        for label in summary.point_labels:
            lines.append([name, label] + [format_cell(by_size[s].attacks[label].worst)
                                          if s in by_size and label in by_size[s].attacks else "" for s in sizes])
    return _table(header, lines)


def iterations_table(summary: Summary) -> Optional[str]:
    """Accuracy against the iteration count of one attack at one threat (Table 10); only swept attacks."""
    series = plots.iteration_series(summary)
    if not series:
        return None
    iters = sorted({x for s in series for x, _ in s.points})
    header = ["Accuracy (%)", "attack, threat"] + [f"{k:g} iter" for k in iters]
    lines = []
    for s in series:
        cells = dict(s.points)
        lines.append([_row_label(s.row, summary, with_defense=True), s.name] + [format_cell(cells.get(k)) for k in iters])
    return _table(header, lines)


def eps_table(summary: Summary) -> Optional[str]:
    by_norm: dict[str, set[float]] = defaultdict(set)
    for p in summary.points.values():
        by_norm[p["norm"]].add(p["eps"])
    if all(len(v) < 2 for v in by_norm.values()):
        return None
    parts = []
    for norm, values in by_norm.items():
        eps = sorted(values)
        header = ["Accuracy (%)", "attack"] + ["0 (natural)"] + [format_eps(e, norm) for e in eps]
        lines = []
        for row in summary.rows:
            by_attack: dict[str, dict[float, Cell]] = defaultdict(dict)
            for pr in row.attacks.values():
                if pr.point["norm"] == norm:
                    by_attack[attack_description(pr.point)][pr.point["eps"]] = pr.worst
            for attack, cells in by_attack.items():
                lines.append([_row_label(row, summary, with_defense=True), attack, format_cell(row.natural)]
                             + [format_cell(cells.get(e)) for e in eps])
        parts.append(f"{norm}:\n\n" + _table(header, lines))
    return "\n\n".join(parts)


def settings_text(summary: Summary) -> str:
    s = summary.settings()
    lines = [
        f"- model: {', '.join(s['models'])}",
        f"- data: {', '.join(s['data'])}; N = {', '.join(map(str, s['n_images']))} class-stratified images",
        f"- attack: {'; '.join(s['attacks']) or '(none)'}",
        f"- threat: {', '.join(s['threats']) or '(none)'}",
        "- defenses: " + "; ".join(f"{name} ({_defense_text(cfg)})" for name, cfg in _defense_configs(summary)),
        f"- batch size: {', '.join(map(str, s['batch_sizes']))}; seed: {', '.join(map(str, s['seeds']))}; "
        f"device: {', '.join(s['devices'])}",
    ]
    if any(r > 1 for r in s["repeats"]):
        lines.append(f"- repeats: {', '.join(map(str, s['repeats']))}")
    lines += _machine_lines(s["machines"])
    return "\n".join(lines)


def _machine_lines(machines: dict[str, list[str]]) -> list[str]:
    """One line per machine the merged runs ran on; which runs, when there are several machines."""
    if len(machines) == 1:
        return [f"- machine: {next(iter(machines))}"]
    return [f"- machine: {text} (runs {', '.join(runs)})" for text, runs in machines.items()]


def _defense_configs(summary: Summary) -> list[tuple[str, dict[str, Any]]]:
    out, seen = [], set()
    for row in summary.rows:
        key = (row.defense, json.dumps(row.defense_config, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append((row.defense, row.defense_config))
    return out


def _defense_text(cfg: dict[str, Any]) -> str:
    kind = cfg.get("kind")  # only non-dent kinds have one (dent.defenses.kinds)
    if kind == "pipeline":
        return " then ".join(_defense_text(stage) for stage in cfg["stages"])
    if kind is not None:
        params = {**cfg.get("params", {}), **{k: v for k, v in cfg.items() if k not in ("kind", "params")}}
        return kind + (" " + " ".join(f"{k}={v}" for k, v in params.items()) if params else "")
    if int(cfg.get("steps", 0)) == 0 and cfg.get("stats") == "fixed" and cfg.get("input") in ("none", None):
        return "static"
    parts = [f"{cfg.get('steps')} steps", f"affine {cfg.get('affine')}", f"stats {cfg.get('stats')}"]
    if cfg.get("input") not in ("none", None):
        parts.append(f"input {cfg.get('input')}")
    if cfg.get("objective") not in ("entropy", None):
        parts.append(f"objective {cfg.get('objective')}")
    parts.append(f"{cfg.get('optimizer')} lr {cfg.get('lr')}")
    if cfg.get("autocast") not in ("none", None):  # the precision a unit ran in (resolved from 'auto')
        parts.append(f"{cfg['autocast']} steps" + (" and prediction" if cfg.get("autocast_prediction") else ""))
    return ", ".join(parts)


AA_NOTE = (
    "AutoAttack and dynamic defenses: AutoAttack queries the defended model at every step, so dent adapts "
    "on every submitted batch (gradients are taken through its final prediction, not its adaptation). "
    "Between attacks it re-batches only the still-robust points, so later attacks submit smaller batches "
    "and dent adapts on those; it also warns that it detected a dynamic defense. Both are recorded per "
    "unit in the run's evaluate.log."
)


def markdown(summary: Summary) -> str:
    parts = ["# Evaluation report", "", settings_text(summary), "", "## Accuracy (%)", "", main_table(summary)]
    for title, table in (
        ("## Time of a defended prediction (clean batches; x static)", time_table(summary)),
        ("## Per attack (worst case over attacks per point)", per_attack_table(summary)),
        ("## Detection (defenses that reject; AUC and TPR over the attack's inputs that fool the classifier)",
         detection_table(summary)),
        ("## Accuracy vs dent steps", steps_table(summary)),
        ("## Accuracy vs batch size", batch_size_table(summary)),
        ("## Accuracy vs attack iterations", iterations_table(summary)),
        ("## Accuracy vs epsilon", eps_table(summary)),
        ("## Security: every attack and the per-point worst case over all of them", security.security_markdown(summary)),
        ("## Attack sanity checks (accuracy -> 0 as epsilon grows; converged in iterations)",
         security.sanity_markdown(summary)),
    ):
        if table:
            parts += ["", title, "", table]
    notes = [INTERVAL_NOTE] + ([REPEATS_NOTE] if any(r > 1 for r in summary.settings()["repeats"]) else [])
    notes += summary.notes
    if any(r.natural is not None and not r.natural.complete for r in summary.rows) or any(
        not pr.worst.complete for r in summary.rows for pr in r.attacks.values()
    ):
        notes.insert(1, "`*`: computed on fewer than N images (partial run or missing shards)")
    if any(pr.dynamic_warning for r in summary.rows for pr in r.attacks.values()):
        notes.append(AA_NOTE)
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


# -- CSV / JSON -------------------------------------------------------------------------------------
CSV_FIELDS = [
    "model", "dataset", "split", "n_images", "subset_seed", "seed", "defense", "steps", "affine", "stats", "input",
    "objective", "batch_size", "measure", "attack", "norm", "eps", "n_iter", "label", "correct", "n", "accuracy",
    "ci_low", "ci_high", "repeats", "repeat_mean", "repeat_min", "repeat_max",
]


def csv_rows(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for row in summary.rows:
        base = {
            "model": row.model, "dataset": row.context["data"]["dataset"], "split": row.context["data"]["split"],
            "n_images": row.context["data"]["n_images"], "subset_seed": row.context["data"]["subset_seed"],
            "seed": row.context["seed"], "defense": row.defense, "steps": row.steps,
            "affine": row.defense_config.get("affine"), "stats": row.defense_config.get("stats"),
            "input": row.defense_config.get("input"), "objective": row.defense_config.get("objective"),
            "batch_size": row.batch_size,
        }
        if row.natural is not None:
            out.append({**base, "measure": "natural", "label": "clean", **cell_fields(row.natural)})
        for label, pr in row.attacks.items():
            point = {"attack": label, "norm": pr.point["norm"], "eps": pr.point["eps"], "n_iter": pr.point.get("n_iter")}
            out.append({**base, "measure": "adversarial", **point, "label": WORST, **cell_fields(pr.worst)})
            for name, cell in pr.per_label.items():
                out.append({**base, "measure": "adversarial", **point, "label": name, **cell_fields(cell)})
    return out


def to_json(summary: Summary) -> dict[str, Any]:
    rows = []
    for row in summary.rows:
        rows.append({
            "model": row.model, "context": row.context, "defense": row.defense, "defense_config": row.defense_config,
            "batch_size": row.batch_size,
            "natural": None if row.natural is None else {**cell_fields(row.natural), "expected": row.natural.expected},
            "natural_draws": None if row.natural_draws is None else cell_fields(row.natural_draws),
            "adversarial": [
                {"attack": label, "point": pr.point, **cell_fields(pr.worst), "expected": pr.worst.expected,
                 "per_attack": {name: cell_fields(c) for name, c in pr.per_label.items()},
                 "dynamic_defense_warning": pr.dynamic_warning}
                for label, pr in row.attacks.items()
            ],
        })
    return {"settings": summary.settings(), "caption": summary.caption(), "rows": rows, "notes": summary.notes,
            "security": security.to_json(summary), "detection": detection_rows(summary)}


# -- writing ----------------------------------------------------------------------------------------
def write_report(paths: Iterable[str | Path], out_dir: str | Path, summary: Optional[Summary] = None) -> ReportFiles:
    """The report of the runs ``paths`` (``summary``: theirs, when the caller has already loaded it)."""
    summary = summary if summary is not None else load_summary(paths)
    out_dir = output_dir(out_dir, "report directory", "choose another one (dent report --out DIR)")
    text = markdown(summary)
    files = ReportFiles(out_dir=out_dir, markdown=out_dir / "report.md", csv=out_dir / "results.csv",
                        json=out_dir / "results.json", text=text)
    files.markdown.write_text(text)
    with open(files.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in csv_rows(summary):
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    files.json.write_text(json.dumps(to_json(summary), indent=2))
    if summary.rows:
        files.figures.append(plots.plot_headline(summary, out_dir / "accuracy.png"))
    if summary.point_labels:
        files.figures.append(plots.plot_accuracy_vs_eps(summary, out_dir / "accuracy_vs_eps.png"))
    if plots.swept_step_families(summary.rows):
        files.figures.append(plots.plot_accuracy_vs_steps(summary, out_dir / "accuracy_vs_steps.png"))
    if plots.iteration_series(summary):
        files.figures.append(plots.plot_accuracy_vs_iterations(summary, out_dir / "accuracy_vs_iterations.png"))
    if len({r.batch_size for r in summary.rows}) > 1:
        files.figures.append(plots.plot_accuracy_vs_batch_size(summary, out_dir / "accuracy_vs_batch_size.png"))
    return files
