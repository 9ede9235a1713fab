"""Per-point worst case over every attack run on a defense, the security table and the attack sanity checks."""

from __future__ import annotations

import pytest
import torch

from dent.evaluation.report import markdown, to_json
from dent.evaluation.security import (
    check_eps_curve, check_iteration_curve, row_worst_case, sanity_checks, security_tables, worst_case_cell,
    worst_case_flags,
)
from dent.evaluation.store import UnitRecord
from dent.evaluation.summary import summarize

CONTEXT = {"model": {"arch": "tiny", "threat_model": "Linf"},
           "data": {"dataset": "cifar10", "split": "test", "n_images": 4, "subset_seed": 0}, "seed": 0}
DEFENSES = {"static": {"steps": 0, "stats": "fixed", "input": "none"}, "dent": {"steps": 10, "stats": "fixed"}}


def test_worst_case_flags_on_hand_made_results():
    def at(flags):  # points are (repeat, position)
        return {(0, position): flag for position, flag in enumerate(flags)}

    results = {
        "autoattack": at([True, True, False, True]),
        "transfer": at([True, False, True, True]),
        "mixed": at([True, True, True, False, True]),  # point 4: only this attack ran on it
    }
    flags = worst_case_flags(results)
    assert flags == at([True, False, False, False])  # robust only if robust under every attack
    cell = worst_case_cell(results, expected=5)
    assert (cell.correct, cell.n, cell.accuracy, cell.complete) == (1, 4, 0.25, False)
    assert worst_case_flags({"a": {0: False, 1: True}}) == {0: False, 1: True}
    assert worst_case_flags({}) == {}


def point(name, eps=8 / 255, n_iter=None, **extra):
    p = {"name": name, "version": "standard" if name == "autoattack" else None, "attacks": [], "mode": "ensemble",
         "norm": "Linf", "eps": eps, "n_iter": n_iter, "n_restarts": None, "n_target_classes": None,
         "n_queries": None, "eot_iter": None, "step_size": None, "random_start": True}
    if name not in ("autoattack", "pgd"):
        from dent.attacks.adaptive_config import AdaptiveSection

        p["adaptive"] = AdaptiveSection().for_attack(name).to_dict()
    p.update(extra)
    return p


def record(defense, attack, robust, labels=(0, 1, 2, 3), positions=(0, 1, 2, 3), batch=0, clean=None):
    spec = {**CONTEXT, "kind": "attack" if attack else "clean", "defense": defense,
            "defense_config": DEFENSES[defense], "attack": attack, "batch_size": len(positions),
            "batch_index": batch, "positions": list(positions)}
    result = {"positions": list(positions), "labels": list(labels)}
    if attack is None:
        result["clean_pred"] = list(clean)
        label = None
    else:
        result["robust"] = robust
        label = f"{attack['name']} {attack['eps']:.4f} {attack.get('n_iter')}"
    key = f"{defense}-{label}-{batch}"
    return UnitRecord(key=key, config_hash="x", kind=spec["kind"], defense=defense, attack=label,
                      batch_size=len(positions), batch_index=batch, spec=spec, result=result, seconds=0.0,
                      device="cpu")


def test_worst_case_over_attacks_in_summary_and_security_table():
    aa, transfer, through = point("autoattack"), point("transfer"), point("through_adaptation")
    other_threat = point("autoattack", eps=16 / 255)
    records = [
        record("static", None, None, clean=[0, 1, 2, 0]),  # 3/4 right
        record("dent", None, None, clean=[0, 1, 2, 3]),
        record("static", aa, {"ensemble": [False, False, True, False]}),
        record("dent", aa, {"ensemble": [True, True, True, False]}),
        # Two labels of one attack point: per point worst case inside the point already.
        record("dent", transfer, {"static:apgd-ce": [True, False, True, True],
                                  "static:ensemble": [True, True, True, True]}),
        record("dent", through, {"apgd-ce": [True, True, False, True], "apgd-t": [True, True, True, True]}),
        record("dent", other_threat, {"ensemble": [False, False, False, False]}),  # another threat: not mixed in
    ]
    summary = summarize(records)
    dent = next(r for r in summary.rows if r.defense == "dent")
    cell = row_worst_case(dent, "Linf 8/255")
    # dent: AA breaks 3, transfer breaks 1, through-adaptation breaks 2 -> only point 0 survives all.
    assert (cell.correct, cell.n) == (1, 4)
    assert dent.attacks[next(iter(dent.attacks))].per_point == {(0, 0): True, (0, 1): True, (0, 2): True, (0, 3): False}
    assert row_worst_case(dent, "Linf 16/255").correct == 0

    tables = {t.threat: t for t in security_tables(summary)}
    t = tables["Linf 8/255"]
    assert t.columns == ["static", "dent"]
    measures = [m for m, _ in t.lines]
    assert measures[0] == "clean" and measures[-1].startswith("worst case")
    assert "[standard: queries the defense; dent's paper protocol]" in measures[1] and measures[2].startswith("transfer")
    assert "through the adaptation" in measures[3]
    clean, worst = t.lines[0][1], t.lines[-1][1]
    assert (clean[0].correct, clean[1].correct) == (3, 4)
    assert (worst[0].correct, worst[1].correct) == (1, 1)  # static: only its AutoAttack ran
    text = markdown(summary)
    assert "## Security" in text and "| worst case over all attacks (per point) | 25.0 [4.6, 69.9] | 25.0 [4.6, 69.9] |" in text
    assert to_json(summary)["security"]["tables"][0]["lines"][-1]["cells"][1]["correct"] == 1


def test_sanity_checks_flag_curves_that_do_not_reach_zero_or_converge():
    ok, _ = check_eps_curve([(1 / 255, 0.6), (4 / 255, 0.2), (16 / 255, 0.0)])
    assert ok
    ok, message = check_eps_curve([(1 / 255, 0.6), (4 / 255, 0.4), (16 / 255, 0.3)])
    assert not ok and "not about 0" in message
    ok, message = check_eps_curve([(1 / 255, 0.3), (4 / 255, 0.5), (16 / 255, 0.0)])
    assert not ok and "rises" in message
    assert check_eps_curve([(1 / 255, 0.3)])[0]  # one point: nothing to check
    # Table 10's curve converges; one still dropping is flagged.
    table10 = [(1, .632), (2, .596), (3, .566), (6, .531), (13, .508), (25, .499), (50, .495), (100, .494),
               (200, .490), (400, .491), (800, .490)]
    assert check_iteration_curve(table10)[0]
    ok, message = check_iteration_curve(table10[:5])
    assert not ok and "still dropping" in message
    # A one-image change is not evidence on a small evaluation.
    assert check_iteration_curve([(10, 0.5), (20, 0.375)], n=8)[0]


def test_report_flags_a_failing_sweep():
    records = [record("dent", None, None, clean=[0, 1, 2, 3])]
    for eps, robust in [(1 / 255, [True, True, True, False]), (8 / 255, [True, True, False, False]),
                        (64 / 255, [True, True, False, False])]:  # stuck at 50%: gradient masking?
        records.append(record("dent", point("through_adaptation", eps=eps), {"apgd-ce": robust}))
    for n_iter, robust in [(10, [True, True, True, True]), (20, [True, False, False, True])]:
        records.append(record("dent", point("autoattack", n_iter=n_iter), {"ensemble": robust}))
    summary = summarize(records)
    checks = {c.kind: c for c in sanity_checks(summary)}
    assert not checks["epsilon"].ok and not checks["iterations"].ok
    text = markdown(summary)
    assert "**2 of 2 check(s) flagged**" in text
    # 50% of 4 images is not about 0 even at its interval's low end [15.0, 85.0]; a drop from 4 to 2 of 4
    # is inside the intervals: flagged, but worded as not shown rather than as still dropping.
    assert "is not about 0" in text and "not shown converged" in text and "within the 95%" in text


def test_sanity_flags_are_worded_by_what_the_intervals_support():
    ok, message = check_iteration_curve([(10, 0.5), (20, 0.4)], n=1000)
    assert not ok and "still dropping" in message and "[" in message
    ok, message = check_iteration_curve([(10, 0.5), (20, 0.4)], n=64)
    assert not ok and "not shown converged" in message
    ok, message = check_eps_curve([(0.01, 0.5), (0.1, 0.2)], n=1000)
    assert not ok and "is not about 0" in message
    ok, message = check_eps_curve([(0.01, 0.5), (0.1, 0.0625)], n=64)
    assert not ok and "is not shown to be about 0" in message


@pytest.mark.parametrize("eps_acc, ok", [([0.5, 0.04], True), ([0.5, 0.06], False)])
def test_eps_threshold(eps_acc, ok):
    assert check_eps_curve([(0.01, eps_acc[0]), (0.1, eps_acc[1])])[0] is ok


def test_adaptive_runs_merge_into_the_security_report(tmp_path):
    """`dent evaluate` configs with adaptive attacks, merged by the report (Python API of both)."""
    import yaml

    from dent.evaluation.config import EvaluateConfig
    from dent.evaluation.report import write_report
    from dent.evaluation.runner import evaluate
    from eval_support import fake_data, tiny_net

    net = tiny_net()
    data = fake_data(8, model=net)
    base = ["device", "cpu", "data.n_images", "8", "data.batch_size", "4", "evaluation.progress", "false",
            "evaluation.report", "false", "attack.threats", "[Linf:32/255]", "attack.n_iter", "2",
            "attack.n_target_classes", "1"]
    defenses = {"defenses": yaml.safe_load("{static: {steps: 0}, dent: {steps: 2, lr: 0.05}}")}
    runs = []
    for name, extra in [("aa", ["attack.version", "custom", "attack.attacks", "[apgd-ce]"]),
                        ("through", ["attack.name", "through_adaptation", "attack.adaptive.checkpoint", "true"]),
                        ("mixed", ["attack.name", "mixed", "attack.adaptive.mixed", "[0.5]",
                                   "attack.adaptive.attacks", "[apgd-ce]"])]:
        cfg = EvaluateConfig.load(None, base + extra, file_defaults=defenses)
        evaluate(cfg, model=net, data=data, run_dir=tmp_path / name)
        runs.append(tmp_path / name)
    files = write_report(runs, tmp_path / "report")
    assert "## Security" in files.text
    tables = to_json_tables(files)
    lines = {line["measure"]: line["cells"] for line in tables[0]["lines"]}
    worst = lines["worst case over all attacks (per point)"]
    attacks = [cells for measure, cells in lines.items()
               if measure not in ("clean", "worst case over all attacks (per point)")]
    assert len(attacks) == 3 and all(c["n"] == 8 for c in worst)
    for column, cell in enumerate(worst):  # the worst case is at most every single attack's accuracy
        assert all(cell["correct"] <= cells[column]["correct"] for cells in attacks)


def to_json_tables(files):
    import json

    return json.loads(files.json.read_text())["security"]["tables"]


def test_an_eot_sweep_that_still_drops_is_flagged_and_one_that_converged_passes():
    def eot_records(accuracies):
        out = [record("dent", None, None, clean=[0, 1, 2, 3])]
        for eot, robust in accuracies:
            rec = record("dent", point("autoattack", n_iter=10, eot_iter=eot), {"ensemble": robust})
            rec.attack = f"{rec.attack} eot {eot}"
            out.append(rec)
        return out

    T, F = True, False
    dropping = eot_records([(1, [T, T, T, T]), (4, [T, T, T, F]), (16, [T, F, F, F])])
    (check,) = [c for c in sanity_checks(summarize(dropping)) if c.kind == "EOT samples"]
    assert not check.ok and "EOT samples" in check.message and check.values == [(1, 1.0), (4, 0.75), (16, 0.25)]
    assert "10 iter" in check.attack and "EOT" not in check.attack  # the budget along the curve is the axis
    converged = eot_records([(1, [T, T, T, T]), (4, [T, F, T, F]), (16, [T, F, T, F])])
    (check,) = [c for c in sanity_checks(summarize(converged)) if c.kind == "EOT samples"]
    assert check.ok and "converged" in check.message


@pytest.mark.parametrize("counts, ok", [({"n": 4, "zero": 0, "nonfinite": 0}, True),
                                        ({"n": 4, "zero": 4, "nonfinite": 0}, False),
                                        ({"n": 4, "zero": 0, "nonfinite": 1}, False)])
def test_a_zero_or_nan_plain_gradient_is_flagged_as_gradient_masking(counts, ok):
    clean = record("dent", None, None, clean=[0, 1, 2, 3])
    clean.result["notes"] = {"plain_gradient": counts}
    attacked = record("dent", point("autoattack"), {"ensemble": [True, True, False, True]})
    summary = summarize([clean, attacked])
    (check,) = [c for c in sanity_checks(summary) if c.kind == "gradient"]
    assert check.ok is ok
    text = markdown(summary)
    assert ("gradient masking" in text) is (not ok)
    if not ok:
        assert f"zero at {counts['zero']} and not finite at {counts['nonfinite']} of 4" in text
    # Stores written before the check have no counts: nothing is claimed either way.
    assert not [c for c in sanity_checks(summarize([record("dent", None, None, clean=[0, 1, 2, 3]), attacked]))
                if c.kind == "gradient"]


def test_evaluation_keeps_the_adversarial_inputs_of_each_attacked_unit_when_asked(tmp_path):
    import yaml

    from dent.defenses import Dent, DentConfig
    from dent.evaluation.config import EvaluateConfig
    from dent.evaluation.runner import evaluate
    from dent.evaluation.unitrun import ADVERSARIAL_DIR
    from dent.evaluation.store import ResultStore
    from dent.models.checkpoints import read_safetensors_metadata, read_state_dict
    from eval_support import fake_data, tiny_net

    net = tiny_net()
    data = fake_data(8, model=net)
    cfg = EvaluateConfig.load(None, [
        "device", "cpu", "data.n_images", "8", "data.batch_size", "4", "evaluation.progress", "false",
        "evaluation.report", "false", "attack.threats", "[Linf:32/255]", "attack.n_iter", "2",
        "attack.n_target_classes", "1", "attack.name", "through_adaptation", "evaluation.save_adversarial", "true",
    ], file_defaults={"defenses": yaml.safe_load("{dent: {steps: 2, lr: 0.05}}")})
    run = evaluate(cfg, model=net, data=data, run_dir=tmp_path / "run")
    files = sorted((run.run_dir / ADVERSARIAL_DIR).glob("*.safetensors"))
    with ResultStore(run.store_path, create=False) as store:
        records = {r.key: r for r in store.records() if r.kind != "clean"}
    assert {f.stem for f in files} == set(records)  # one file per attacked unit, named by its key
    dent = Dent(net, DentConfig(steps=2, lr=0.05))
    for path in files:
        tensors, record = read_state_dict(path), records[path.stem]
        assert read_safetensors_metadata(path)["dent.unit_key"] == path.stem
        x = data.images[tensors["positions"]]
        for label, pred in record.result["pred"].items():
            x_adv = tensors[f"x_adv/{label}"]
            assert (x_adv - x).abs().max() <= 32 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
            with torch.no_grad():
                assert dent(x_adv).argmax(1).tolist() == pred  # resubmitted, they give the stored answers
        assert tensors["worst"].shape == x.shape and tensors["labels"].tolist() == record.result["labels"]
