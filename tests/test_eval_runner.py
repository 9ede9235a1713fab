"""The evaluation runner through its Python API: units, resume, config-change refusal, shards, reports."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dent.evaluation.config import EvaluateConfig
from dent.errors import ConfigError
from dent.evaluation.report import load_summary, write_report
from dent.evaluation.rundir import ConfigMismatchError, NotARunError, find_store
from dent.evaluation.runner import evaluate
from dent.evaluation.store import ResultStore
from eval_support import fake_data, tiny_net

N = 12
BASE = [
    "device", "cpu", "data.n_images", str(N), "data.batch_size", "4", "evaluation.progress", "false",
    "attack.version", "custom", "attack.attacks", "[apgd-ce, apgd-t]", "attack.threats", "[Linf:16/255]",
    "attack.n_iter", "2", "attack.n_restarts", "1", "attack.n_target_classes", "1",
]


DEFENSES = "{static: {steps: 0}, dent: {steps: 1, lr: 0.01}}"


def config(*overrides, defenses=DEFENSES):
    """The test config; ``defenses`` replaces the defense list (overrides merge into it)."""
    import yaml

    return EvaluateConfig.load(None, BASE + list(overrides), file_defaults={"defenses": yaml.safe_load(defenses)})


@pytest.fixture(scope="module")
def model_and_data():
    net = tiny_net()
    return net, fake_data(N, model=net)


def run(cfg, run_dir, model_and_data):
    net, data = model_and_data
    return evaluate(cfg, model=net, data=data, run_dir=run_dir)


def numbers(run_dirs):
    s = load_summary(run_dirs)
    out = {}
    for row in s.rows:
        out[(row.defense, "natural")] = (row.natural.correct, row.natural.n)
        for label, pr in row.attacks.items():
            out[(row.defense, label)] = (pr.worst.correct, pr.worst.n)
    return out


def unit_keys(run_dir):
    with ResultStore(find_store(run_dir), create=False) as store:
        return sorted(r.key for r in store.records())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_and_data):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    result = run(config(), run_dir, model_and_data)
    return run_dir, result


def test_units_results_and_files(full_run):
    run_dir, result = full_run
    # 2 defenses x 3 batches x (clean + 1 attack point)
    assert result.n_units == 12 and result.n_run == 12 and result.n_skipped == 0
    for name in ("config.yaml", "config.hash", "provenance.json", "results.sqlite", "evaluate.log"):
        assert (run_dir / name).is_file(), name
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        records = list(store.records())
        assert store.get_meta("config_hash") == result.config_hash
    assert {r.config_hash for r in records} == {result.config_hash}
    attack = next(r for r in records if r.kind == "attack")
    assert set(attack.result) >= {"positions", "labels", "robust", "pred", "notes"}
    assert list(attack.result["robust"]) == ["ensemble"]
    # positions cover the subset exactly once per defense and kind
    for defense in ("static", "dent"):
        for kind in ("clean", "attack"):
            pos = sorted(p for r in records if r.defense == defense and r.kind == kind for p in r.result["positions"])
            assert pos == list(range(N))


def test_log_records_autoattack_behaviour(full_run):
    run_dir, result = full_run
    log = (run_dir / "evaluate.log").read_text()
    assert "auto-attack" in log and "it seems to be a dynamic defense" in log
    assert "AutoAttack re-batching (each attack only gets the still-robust points)" in log
    assert result.dynamic_warnings == 3  # the dent units, not the static ones


def test_resume_skips_finished_units(full_run, model_and_data):
    run_dir, first = full_run
    before = numbers([run_dir])
    again = run(config(), run_dir, model_and_data)
    assert again.n_run == 0 and again.n_skipped == 12
    assert numbers([run_dir]) == before
    # display-only keys may change on resume
    again = run(config("evaluation.progress", "true", "evaluation.report", "false"), run_dir, model_and_data)
    assert again.n_run == 0


def test_partial_store_resumes_only_missing_units(full_run, model_and_data, tmp_path):
    import shutil

    run_dir, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with sqlite3.connect(copy / "results.sqlite") as db:
        db.execute("DELETE FROM units WHERE rowid IN (SELECT rowid FROM units ORDER BY rowid DESC LIMIT 5)")
    resumed = run(config(), copy, model_and_data)
    assert resumed.n_run == 5 and resumed.n_skipped == 7
    assert unit_keys(copy) == unit_keys(run_dir)
    assert numbers([copy]) == numbers([run_dir])


def test_config_change_is_refused_with_the_differing_keys(full_run, model_and_data):
    run_dir, _ = full_run
    with pytest.raises(ConfigMismatchError) as err:
        run(config("defenses.dent.steps", "2", "attack.n_iter", "3"), run_dir, model_and_data)
    message = str(err.value)
    assert "defenses.dent.steps: 1 (stored) -> 2 (now)" in message
    assert "attack.n_iter: [2] (stored) -> [3] (now)" in message
    assert "output.name" in message
    # nothing was added
    assert len(unit_keys(run_dir)) == 12


def test_shards_merge_into_the_full_result(full_run, model_and_data, tmp_path):
    run_dir, _ = full_run
    shards = []
    for i in (1, 2):
        shard_dir = tmp_path / f"shard{i}"
        res = run(config("evaluation.shard", f"{i}/2"), shard_dir, model_and_data)
        assert res.n_units in (4, 8)
        shards.append(shard_dir)
    assert set(unit_keys(shards[0])).isdisjoint(unit_keys(shards[1]))
    assert sorted(unit_keys(shards[0]) + unit_keys(shards[1])) == unit_keys(run_dir)
    assert numbers(shards) == numbers([run_dir])
    # one shard alone is reported as partial
    text = write_report([shards[0]], tmp_path / "partial").text
    assert "partial" in text and "*" in text


def test_report_files(full_run, tmp_path):
    run_dir, _ = full_run
    files = write_report([run_dir], tmp_path / "report")
    assert files.markdown.is_file() and files.csv.is_file() and files.json.is_file()
    names = {p.name for p in files.figures}
    assert {"accuracy.png", "accuracy_vs_eps.png"} <= names
    for fig in files.figures:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = files.text
    assert "| Accuracy (%) | Natural static | Natural dent | Adversarial static | Adversarial dent |" in text
    assert "N = 12" in text and "Linf 16/255" in text
    data = json.loads(files.json.read_text())
    assert data["settings"]["n_images"] == [N] and data["settings"]["steps"] == {"static": 0, "dent": 1}
    assert "model:" in data["caption"] and "seed:" in data["caption"]
    rows = files.csv.read_text().splitlines()
    assert rows[0].startswith("model,dataset,split")
    assert len(rows) == 1 + 2 * (1 + 2)  # per defense: natural, worst case, ensemble


def test_per_attack_mode_and_worst_case(model_and_data, tmp_path):
    cfg = config("attack.mode", "both", defenses="{static: {steps: 0}}")
    run(cfg, tmp_path / "run", model_and_data)
    summary = load_summary([tmp_path / "run"])
    (row,) = summary.rows
    (pr,) = row.attacks.values()
    assert list(pr.per_label) == ["apgd-ce", "apgd-t", "ensemble"]
    assert pr.worst.correct <= min(c.correct for c in pr.per_label.values())
    text = write_report([tmp_path / "run"], tmp_path / "rep").text
    assert "## Per attack" in text and "worst case" in text


def test_sweeps_steps_iterations_eps_batch_sizes(model_and_data, tmp_path):
    cfg = config(
        "attack.name", "pgd", "attack.version", "standard", "attack.attacks", "[]",
        "attack.threats", "[Linf:4/255, Linf:16/255, L2:0.5]", "attack.n_iter", "[1, 2]",
        "evaluation.batch_sizes", "[4, 12]",
        defenses="{static: {steps: 0}, d1: {steps: 1}, d2: {steps: 2}}",
    )
    res = run(cfg, tmp_path / "run", model_and_data)
    # 3 defenses x (batches 3 + 1) x (clean + 6 points)
    assert res.n_units == 3 * 4 * 7
    files = write_report([tmp_path / "run"], tmp_path / "rep")
    names = {p.name for p in files.figures}
    assert names == {"accuracy.png", "accuracy_vs_eps.png", "accuracy_vs_steps.png",
                     "accuracy_vs_iterations.png", "accuracy_vs_batch_size.png"}
    for title in ("dent steps", "batch size", "attack iterations", "epsilon"):
        assert f"## Accuracy vs {title}" in files.text


def test_bad_input_is_a_clear_error(model_and_data, tmp_path):
    net, data = model_and_data
    with pytest.raises(ConfigError, match="data.n_images.*only 12"):
        evaluate(config("data.n_images", "50"), model=net, data=data, run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="L2 epsilon 20 is out of range"):  # 3x8x8 inputs
        evaluate(config("attack.threats", "L2:20"), model=net, data=data, run_dir=tmp_path / "b")
    with pytest.raises(NotARunError, match="not a run directory"):
        load_summary([tmp_path])
    with pytest.raises(NotARunError, match="does not exist"):
        load_summary([tmp_path / "nope"])
