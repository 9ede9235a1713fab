"""Reports that show what was measured: intervals, repeats, the worst-case headline, per-attack iteration
curves, distinct curve styles, machines and model identity in the header, timing without warm-up, the
committed stores, and a bit-for-bit rerun on one machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dent.evaluation import plots
from dent.evaluation.report import (
    CSV_FIELDS, csv_rows, iterations_table, load_summary, markdown, time_table, to_json, write_report,
)
from dent.evaluation.rundir import find_store
from dent.evaluation.store import ResultStore
from dent.evaluation.summary import Cell, cell_fields, format_cell, summarize, wilson_interval
from test_eval_security import DEFENSES, point, record

REPO = Path(__file__).resolve().parents[1]


# -- intervals --------------------------------------------------------------------------------------
#: Published 95% Wilson intervals (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001): (k, n, low, high).
PUBLISHED = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("k, n, low, high", PUBLISHED)
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_matches_scipy_on_small_cases():
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 2, 3, 5, 8, 13, 64):
        for k in range(n + 1):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)
    low, high = wilson_interval(0, 0)
    assert low != low and high != high  # nan: no points, no interval


def test_every_output_carries_the_interval():
    cell = Cell(expected=64)
    cell.add(58, 64)
    assert format_cell(cell) == "90.6 [81.0, 95.6]"
    fields = cell_fields(cell)
    assert (fields["ci_low"], fields["ci_high"]) == (0.810171, 0.956322) and fields["repeats"] == 1
    partial = Cell(expected=64)
    partial.add(3, 4)
    assert format_cell(partial).endswith("*")

    summary = summarize([record("dent", None, None, clean=[0, 1, 2, 0]),
                         record("dent", point("autoattack"), {"ensemble": [True, False, True, False]})])
    text = markdown(summary)
    assert "| tiny | 75.0 [30.1, 95.4] | 50.0 [15.0, 85.0] |" in text and "Wilson" in text
    rows = csv_rows(summary)
    assert {"ci_low", "ci_high"} <= set(CSV_FIELDS) and all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)
    data = to_json(summary)
    assert data["rows"][0]["natural"]["ci_high"] == pytest.approx(0.954, abs=1e-3)
    assert data["security"]["tables"][0]["lines"][-1]["cells"][0]["ci_low"] == pytest.approx(0.150, abs=1e-3)


# -- repeats ----------------------------------------------------------------------------------------
def repeated(rec, repeat):
    rec.spec = {**rec.spec, "repeat": repeat}
    rec.key = f"{rec.key}-r{repeat}"
    return rec


def test_repeats_pool_with_mean_min_and_max():
    aa, transfer = point("autoattack"), point("transfer")
    robust = {0: [True, True, True, False], 1: [True, False, False, False], 2: [True, True, False, False]}
    records = []
    for r in (0, 1, 2):
        records.append(repeated(record("dent", None, None, clean=[0, 1, 2, 3]), r))
        records.append(repeated(record("dent", aa, {"ensemble": robust[r]}), r))
        records.append(repeated(record("dent", transfer, {"static:ensemble": [True, True, True, r != 0]}), r))
    summary = summarize(records)
    (row,) = summary.rows
    cell = row.attacks[next(iter(row.attacks))].worst
    assert (cell.correct, cell.n, cell.complete) == (6, 12, True)
    spread = cell.spread
    assert (spread.mean, spread.min, spread.max, spread.count) == (0.5, 0.25, 0.75, 3)
    assert format_cell(cell) == "50.0 [25.4, 74.6] (25.0-75.0)"
    fields = cell_fields(cell)
    assert (fields["repeats"], fields["repeat_mean"], fields["repeat_min"], fields["repeat_max"]) == (3, 0.5, 0.25, 0.75)
    # The worst case over attacks is per point within a repeat: repeat 0 point 3 falls to both attacks,
    # repeat 1 and 2 points only to AutoAttack.
    worst = to_json(summary)["security"]["tables"][0]["lines"][-1]["cells"][0]
    assert (worst["correct"], worst["n"], worst["repeat_min"], worst["repeat_max"]) == (6, 12, 0.25, 0.75)
    text = markdown(summary)
    assert "- repeats: 3" in text and "(min-max)" in text
    assert Cell().spread is None and row.natural.spread.min == row.natural.spread.max == 1.0


# -- the headline figure ----------------------------------------------------------------------------
def test_headline_shows_the_worst_case_beside_the_paper_protocol():
    aa, transfer = point("autoattack"), point("transfer")
    records = [
        record("static", None, None, clean=[0, 1, 2, 3]), record("dent", None, None, clean=[0, 1, 2, 3]),
        record("static", aa, {"ensemble": [False, False, False, True]}),
        record("dent", aa, {"ensemble": [True, True, True, False]}),  # the paper's protocol: 75%
        record("dent", transfer, {"static:ensemble": [False, False, True, True]}),  # transfer breaks 2 others
        record("dent", point("autoattack", eps=16 / 255), {"ensemble": [False] * 4}),
    ]
    panels = plots.headline_panels(summarize(records))
    assert [p.title for p in panels] == ["tiny, Linf 8/255", "tiny, Linf 16/255"]
    first = panels[0]
    assert first.columns == ["static", "dent"]
    measures = [m for m, _ in first.bars]
    assert measures[0] == "natural" and "[standard: queries the defense; dent's paper protocol]" in measures[1]
    assert measures[2].startswith("worst case over all 2")
    protocol, worst = first.bars[1][1], first.bars[2][1]
    assert protocol[1].correct == 3 and worst[1].correct == 1  # dent: 75% under the protocol, 25% worst case
    assert worst[0].correct == 1  # static: only AutoAttack ran on it
    assert len(panels[1].bars) == 2  # one attack: no separate worst case
    heights, (below, above) = plots._percent_errors(protocol)
    assert heights[1] == 75.0 and below[1] > 0 and above[1] > 0


# -- iteration curves: by attack and threat ---------------------------------------------------------
def test_iteration_curves_join_only_one_attack_at_one_threat():
    transfer = point("transfer", n_iter=10)
    surrogate = point("surrogate_transfer", n_iter=20)
    records = [record("dent", transfer, {"static:ensemble": [True, True, False, False]}),
               record("dent", surrogate, {"static:apgd-t": [True, False, False, False]})]
    summary = summarize(records)
    assert plots.iteration_series(summary) == [] and iterations_table(summary) is None  # two attacks: no sweep

    for n_iter, robust in [(10, [True, True, True, False]), (20, [True, True, False, False])]:
        records.append(record("dent", point("autoattack", n_iter=n_iter), {"ensemble": robust}))
        records.append(record("dent", point("autoattack", n_iter=n_iter, eps=16 / 255), {"ensemble": [False] * 4}))
    summary = summarize(records)
    series = plots.iteration_series(summary)
    assert len(series) == 2 and all("AutoAttack standard" in s.name for s in series)
    assert [{"Linf 8/255": 0, "Linf 16/255": 1}[s.attack.rsplit(", ", 1)[1]] for s in series] == [0, 1]
    assert [(x, c.correct) for x, c in series[0].points] == [(10, 3), (20, 2)]
    table = iterations_table(summary)
    assert "| 10 iter | 20 iter |" in table and "75.0 [30.1, 95.4]" in table and "transfer" not in table


# -- curves that coincide stay visible --------------------------------------------------------------
def test_defenses_get_distinct_markers_line_styles_and_colors():
    rows = summarize([record("static", None, None, clean=[0, 1, 2, 3]),
                      record("dent", None, None, clean=[0, 1, 2, 3])]).rows
    styles = plots.defense_styles(rows)
    assert styles["static"]["marker"] != styles["dent"]["marker"]
    assert styles["static"]["linestyle"] != styles["dent"]["linestyle"]
    assert styles["static"]["markersize"] > styles["dent"]["markersize"]  # the later one drawn inside
    aa = point("autoattack")
    summary = summarize([record("static", None, None, clean=[0, 1, 2, 3]), record("dent", None, None, clean=[0, 1, 2, 3]),
                         record("static", aa, {"ensemble": [False] * 4}), record("dent", aa, {"ensemble": [False] * 4})])
    series = plots.eps_series(summary)["Linf"]
    assert [s.row.defense for s in series] == ["static", "dent"]
    assert len(set(plots.series_colors(series))) == 2  # one attack: colored by defense


def test_steps_are_plotted_only_when_swept():
    static_and_dent = [record("static", None, None, clean=[0, 1, 2, 3]), record("dent", None, None, clean=[0, 1, 2, 3])]
    assert plots.swept_step_families(summarize(static_and_dent).rows) == {}
    DEFENSES["dent3"] = {"steps": 3, "stats": "fixed"}
    try:
        swept = plots.swept_step_families(summarize(static_and_dent + [record("dent3", None, None, clean=[0, 1, 2, 3])]).rows)
    finally:
        del DEFENSES["dent3"]
    (members,) = swept.values()
    assert [r.steps for r in members] == [0, 3, 10]  # the static model is the 0-step point


def test_time_table_takes_the_median_over_units():
    records = []
    for defense, seconds in (("static", [4.0, 0.4, 0.4]), ("dent", [8.0, 4.0, 4.0])):  # first unit: warm-up
        for batch, s in enumerate(seconds):
            rec = record(defense, None, None, clean=[0, 1, 2, 3], batch=batch)
            rec.seconds = s
            records.append(rec)
    table = time_table(summarize(records))
    assert "| tiny / static | 0 | 3 | 100.0 | 1.0x |" in table and "| tiny / dent | 10 | 3 | 1000.0 | 10.0x |" in table
    assert "median" in table


# -- header: machines and the evaluated model -------------------------------------------------------
def write_store(run_dir: Path, records, identity=None, provenance=None) -> Path:
    with ResultStore(run_dir / "results.sqlite") as store:
        for rec in records:
            store.put(rec)
        if identity is not None:
            store.set_meta("identity", identity)
    if provenance is not None:
        (run_dir / "provenance.json").write_text(json.dumps(provenance))
    return run_dir


def test_header_names_the_machines_and_the_evaluated_model(tmp_path):
    avx2 = {"versions": {"torch": "2.13.0+cpu"}, "machine": {"processor": "x86_64"},
            "numerics": {"cpu_model": "AMD EPYC 7B13", "cpu_capability": "AVX2", "intra_op_threads": 2}}
    avx512 = {"versions": {"torch": "2.13.0+cpu"}, "machine": {"processor": "x86_64"},
              "numerics": {"cpu_model": "Intel Xeon", "cpu_capability": "AVX512", "intra_op_threads": 1}}
    identity = {"model": {"arch": "MyNet", "digest": "abc123"}, "data": {"digest": "d00d"}}
    a = write_store(tmp_path / "a", [record("dent", None, None, clean=[0, 1, 2, 3])], identity, avx2)
    b = write_store(tmp_path / "b", [record("static", None, None, clean=[0, 1, 2, 0])], None, avx512)
    summary = load_summary([a, b])
    text = markdown(summary)
    assert "- machine: AMD EPYC 7B13, CPU capability AVX2, 2 thread(s), torch 2.13.0+cpu (runs a)" in text
    assert "- machine: Intel Xeon, CPU capability AVX512, 1 thread(s), torch 2.13.0+cpu (runs b)" in text
    # The custom model is named by its identity, not by the config's arch; the other store has none.
    assert "- model: MyNet (digest abc123), tiny" in text and "data digest d00d" in text
    assert {r.defense: r.model for r in summary.rows} == {"dent": "MyNet", "static": "tiny"}
    old = load_summary([write_store(tmp_path / "old", [record("dent", None, None, clean=[0, 1, 2, 3])])])
    assert "machine not recorded" in markdown(old) and old.rows[0].model == "tiny"


def test_provenance_records_what_changes_numerics(tmp_path):
    from dent.provenance import write_run_metadata

    write_run_metadata(tmp_path, {"device": "cpu"})
    numerics = json.loads((tmp_path / "provenance.json").read_text())["numerics"]
    assert numerics["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics["intra_op_threads"] == torch.get_num_threads()
    assert numerics["inter_op_threads"] == torch.get_num_interop_threads()
    assert numerics["device_name"] == "cpu" and numerics["torch"] == torch.__version__
    assert numerics["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert {"cpu_model", "onednn", "mkl", "blas"} <= set(numerics)


# -- committed stores -------------------------------------------------------------------------------
def committed_groups() -> list[list[Path]]:
    """The committed run directories under results/, one group per folder of runs (merged as the READMEs do)."""
    groups: dict[Path, list[Path]] = {}
    for store in sorted((REPO / "results").glob("**/results.sqlite")):
        run = store.parent
        groups.setdefault(run.parent if run.parent != REPO / "results" else run, []).append(run)
    return list(groups.values())


@pytest.mark.parametrize("runs", committed_groups(), ids=lambda runs: runs[0].parent.name)
def test_committed_stores_still_report(runs, tmp_path):
    files = write_report(runs, tmp_path / "report")
    assert "[" in files.text and files.figures and files.figures[0].name == "accuracy.png"
    assert all(find_store(r) for r in runs)


# -- same machine, same command, same store ---------------------------------------------------------
def test_rerun_on_one_machine_stores_the_same_results_bit_for_bit(tmp_path):
    from dent.evaluation.runner import evaluate
    from eval_support import fake_data, tiny_net
    from test_eval_runner import config

    net = tiny_net()
    data = fake_data(12, model=net)
    stored = []
    for name in ("first", "second"):
        evaluate(config("evaluation.report", "false"), model=net, data=data, run_dir=tmp_path / name)
        with ResultStore(tmp_path / name / "results.sqlite", create=False) as store:
            stored.append({r.key: json.dumps(r.result, sort_keys=True) for r in store.records()})
        numerics = json.loads((tmp_path / name / "provenance.json").read_text())["numerics"]
        assert numerics["deterministic_algorithms"] is True
    assert len(stored[0]) == 12 and stored[0] == stored[1]
    assert torch.are_deterministic_algorithms_enabled()


def test_the_defense_description_names_a_reduced_precision():
    from dent.defenses import DentConfig
    from dent.evaluation.report import _defense_text

    plain = DentConfig(steps=2).to_dict()
    assert "bfloat16" not in _defense_text(plain)
    assert _defense_text({**plain, "autocast": "bfloat16"}).endswith("bfloat16 steps")
    assert _defense_text({**plain, "autocast": "bfloat16", "autocast_prediction": True}).endswith(
        "bfloat16 steps and prediction")


def test_a_by_name_identity_and_none_are_one_row(tmp_path):
    """Newer stores record the model and data by name, older ones nothing: merged, one column per defense."""
    by_name = {"model": {"arch": "tiny", "threat_model": "Linf"}, "data": {"dataset": "cifar10", "n_images": 4}}
    old = write_store(tmp_path / "old", [record("dent", None, None, clean=[0, 1, 2, 3])])
    new = write_store(tmp_path / "new", [record("dent", point("autoattack"), {"ensemble": [True] * 4})], by_name)
    summary = load_summary([old, new])
    (row,) = summary.rows
    assert row.natural.n == 4 and len(row.attacks) == 1


def test_merged_runs_that_share_a_label_but_not_the_attack_get_rows_of_their_own():
    """Labels do not show every attack setting (eot_iter): a merged run with another setting is named by it."""
    from dent.evaluation.summary import _distinct_label

    points = {"DECLARED_APGD Linf 8/255 iter=10": {"name": "declared_apgd", "eot_iter": 2, "n_iter": 10}}
    same = {"name": "declared_apgd", "eot_iter": 2, "n_iter": 10}
    other = {"name": "declared_apgd", "eot_iter": 32, "n_iter": 10}
    label = "DECLARED_APGD Linf 8/255 iter=10"
    assert _distinct_label(label, same, points) == label
    assert _distinct_label(label, other, points) == label + " eot_iter=32"
    assert _distinct_label("PGD Linf 8/255 iter=10", other, points) == "PGD Linf 8/255 iter=10"
