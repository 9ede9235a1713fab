"""``dent evaluate`` and ``dent report`` on the command line: a small real run, errors, the main job config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dent.cli.main import main
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.mainjob import main_job
from eval_support import write_fake_cifar10, write_small_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A fake CIFAR-10 folder (40 test images) and a random ResNet-26-1 checkpoint."""
    root = tmp_path_factory.mktemp("small")
    return {
        "data": write_fake_cifar10(root / "data"),
        "ckpt": write_small_checkpoint(root / "resnet26_1.pt"),
        "root": root,
    }


def small_args(small, name: str) -> list[str]:
    return [
        "model.arch", "resnet26_1", "model.checkpoint", small["ckpt"], "data.dir", small["data"],
        "data.n_images", "8", "data.batch_size", "4", "device", "cpu", "evaluation.progress", "false",
        "output.root", small["root"] / "runs", "output.name", name,
        "attack.version", "custom", "attack.attacks", "[apgd-ce, apgd-t]", "attack.n_iter", "2",
        "attack.n_restarts", "1", "attack.n_target_classes", "1",
    ]


def test_main_yaml_mirrors_the_builtin_main_job():
    assert EvaluateConfig.load(REPO / "cfgs" / "main.yaml") == EvaluateConfig.load(None, file_defaults=main_job())
    job = EvaluateConfig.load(None, file_defaults=main_job())
    assert job.model.arch == "autoattack_resnet18" and job.data.dataset == "cifar10"
    assert list(job.defenses) == ["static", "dent", "dent_sigma"]
    assert job.defenses["dent_sigma"].input.value == "batch" and job.defenses["static"].steps == 0
    (point,) = job.attack.points()
    assert point.norm.value == "Linf" and point.eps == pytest.approx(1.5 / 255)


def test_evaluate_prints_the_table_and_writes_the_report(capsys, small):
    code, out, err = run_cli(capsys, "evaluate", "--cfg", REPO / "cfgs" / "main.yaml", *small_args(small, "cli"))
    assert code == 0, err
    assert "| Accuracy (%) | Natural static | Natural dent | Natural dent_sigma | Adversarial static |" in out
    assert "N = 8" in out and "Linf 1.5/255" in out
    run_dir = small["root"] / "runs" / "cli"
    report = run_dir / "report"
    for name in ("report.md", "results.csv", "results.json", "accuracy.png", "accuracy_vs_eps.png"):
        assert (report / name).is_file(), name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["arch"] == "resnet26_1"

    # Re-running resumes: nothing to compute.
    code, out, err = run_cli(capsys, "evaluate", "--cfg", REPO / "cfgs" / "main.yaml", *small_args(small, "cli"))
    assert code == 0 and "0 unit(s) run, 12 resumed" in out

    # A changed config in the same run directory is refused, naming the key.
    code, out, err = run_cli(capsys, "evaluate", "--cfg", REPO / "cfgs" / "main.yaml", *small_args(small, "cli"),
                             "defenses.dent.steps", "5")
    assert code == 2
    assert "refusing to mix" in err and "defenses.dent.steps: 2 (stored) -> 5 (now)" in err

    # dent report rewrites the report, also into another folder.
    code, out, err = run_cli(capsys, "report", run_dir, "--out", small["root"] / "rep")
    assert code == 0, err
    assert "## Accuracy (%)" in out and (small["root"] / "rep" / "accuracy.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["attack.name", "deepfool"], "unknown attack 'deepfool'"),
    (["attack.version", "custom", "attack.attacks", "[apgd-xx]"], "unknown AutoAttack attack 'apgd-xx'"),
    (["attack.threats", "L1:0.5"], "'Linf' or 'L2'"),
    (["attack.threats", "Linf:8"], "out of range (0, 1]"),
    (["attack.threats", "L2:100"], "L2 epsilon 100 is out of range"),
    (["data.n_images", "1000"], "cannot draw n=1000 images from a split of 40"),
    (["evaluation.shard", "3/2"], "'evaluation.shard'"),
    (["evaluation.clean_draws", "0"], "'evaluation.clean_draws': Input should be greater than or equal to 1 (got 0)"),
])
def test_bad_input_is_a_clear_error(capsys, small, extra, message):
    code, out, err = run_cli(capsys, "evaluate", *small_args(small, "bad"), *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (small["root"] / "runs" / "bad").exists()  # bad input leaves no run directory behind


def test_report_of_something_that_is_not_a_run(capsys, tmp_path):
    code, out, err = run_cli(capsys, "report", tmp_path)
    assert code == 2 and "is not a run directory" in err
    code, out, err = run_cli(capsys, "report", tmp_path / "missing")
    assert code == 2 and "does not exist" in err


def test_every_experiment_config_is_valid():
    names = sorted(p.name for p in (REPO / "cfgs").glob("table*.yaml"))
    assert {"table1_linf.yaml", "table1_l2.yaml", "table2.yaml", "table4.yaml", "table7.yaml", "table8.yaml",
            "table9.yaml", "table10.yaml", "table12.yaml", "table13.yaml"} <= set(names)
    for name in names + ["main.yaml", "figure4.yaml"]:
        cfg = EvaluateConfig.load(REPO / "cfgs" / name)
        assert cfg.attack.points() and cfg.defenses, name


def test_dry_run_prints_the_units_and_an_estimate_and_runs_nothing(capsys, small):
    args = ["evaluate", "--cfg", REPO / "cfgs" / "main.yaml", *small_args(small, "dry")]
    code, out, err = run_cli(capsys, *args, "--dry-run")
    assert code == 0, err
    run_dir = small["root"] / "runs" / "dry"
    assert not run_dir.exists()  # nothing written
    assert "model:\n  arch: resnet26_1" in out  # the resolved config
    # 3 defenses x (clean + AutoAttack) x 2 batches of 4
    assert "units: 12 planned, 0 already stored, 12 to run" in out
    assert "| static | dent | 4 |" in out and "estimate:" in out
    # after the real run, its units count as stored and nothing is left to time
    assert run_cli(capsys, *args)[0] == 0
    code, out, _ = run_cli(capsys, *args, "--dry-run")
    assert code == 0 and "units: 12 planned, 12 already stored, 0 to run" in out and "| static |" not in out


def test_dry_run_of_the_cluster_job_times_an_architecture_whose_weights_are_not_here(capsys, small):
    pytest.importorskip("ray", reason="cfgs/table1_security.yaml runs on Ray: pip install -e '.[ray]'")
    code, out, err = run_cli(
        capsys, "evaluate", "--cfg", REPO / "cfgs" / "table1_security.yaml", "model.arch", "Wong2020Fast",
        "model.model_dir", small["root"] / "no-models", "data.dir", small["data"], "data.n_images", "8",
        "data.batch_size", "8", "attack.version", "custom", "attack.attacks=[apgd-ce]", "attack.n_iter", "2",
        "defenses.dent.steps", "1", "defenses.dent+.steps", "1", "evaluation.ray.workers", "4", "device", "cpu",
        "output.root", small["root"] / "cluster-dry", "--dry-run")
    assert code == 0, err
    assert "timed on Wong2020Fast's architecture with random weights: its checkpoint is not on this machine" in out
    assert "defense calls in all: " in out and "with evaluation.executor ray and 4 workers" in out
    assert not (small["root"] / "cluster-dry").exists() and not (small["root"] / "no-models").exists()


def test_benchmark_defenses_returns_the_table_of_the_same_dent_evaluate_run(capsys, tmp_path, cifar10_dir):
    """RobustBench's convention: one call, the table returned; on the shipped ResNet-18 at a tiny budget."""
    import json

    import dent

    attack = {"version": "custom", "attacks": ["apgd-ce"], "threats": ["Linf:8/255"], "n_iter": [2], "n_restarts": 1}
    results = dent.benchmark_defenses(
        "autoattack_resnet18", defenses={"static": {"steps": 0}, "dent": {"steps": 1}}, attack=attack,
        n_images=8, batch_size=8, data={"dir": str(cifar10_dir)}, evaluation={"progress": False},
        device="cpu", run_dir=tmp_path / "api")
    cfg = tmp_path / "same.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"arch": "autoattack_resnet18"},
                                   "defenses": {"static": {"steps": 0}, "dent": {"steps": 1}}, "attack": attack,
                                   "data": {"n_images": 8, "batch_size": 8}}))
    code, out, err = run_cli(capsys, "evaluate", "--cfg", cfg, "data.dir", cifar10_dir, "evaluation.progress", "false",
                             "device", "cpu", "output.root", tmp_path, "output.name", "cli")
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "report" / "results.json").read_text())
    table = results.to_dict()
    assert set(table["defense"]) == {"static", "dent"} and len({len(v) for v in table.values()}) == 1
    for row in cli["rows"]:
        assert results.accuracy(row["defense"]) == row["natural"]["accuracy"]
        for adv in row["adversarial"]:
            assert results.accuracy(row["defense"], adv["attack"]) == adv["accuracy"]
            for label, cell in adv["per_attack"].items():
                assert results.accuracy(row["defense"], adv["attack"], label) == cell["accuracy"]
    assert str(results).splitlines()[0].startswith("- model: autoattack_resnet18") and "[" in str(results)
    with pytest.raises(KeyError, match="no result for defense 'nope'"):
        results.accuracy("nope")


def test_progress_off_a_terminal_is_one_line_per_unit_weighted_by_expected_cost(capsys, small):
    from dent.defenses.protocol import Traits
    from dent.evaluation.progress import unit_weight
    from dent.evaluation.runner import plan, measured_identity

    args = [a if a != "false" else "true" for a in small_args(small, "progress")]  # evaluation.progress true
    code, out, err = run_cli(capsys, "evaluate", "--cfg", REPO / "cfgs" / "main.yaml", *args)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(lines) == 12 and lines[-1].startswith("[12/12]") and "100% of the expected work" in lines[-1]
    assert "\r" not in err  # no redrawn bar in a log
    cfg = EvaluateConfig.load(REPO / "cfgs" / "main.yaml", [str(a) for a in small_args(small, "w")])
    units = plan(cfg, measured_identity(cfg), 8)
    clean = next(u for u in units if u.kind == "clean")
    attacked = next(u for u in units if u.kind != "clean")
    plain, costly = Traits(), Traits(cost=21.0)
    assert unit_weight(attacked, plain) > 10 * unit_weight(clean, plain)  # AutoAttack: ~30 queries per batch here
    assert unit_weight(clean, costly) == 21 * unit_weight(clean, plain)  # scaled by the defense's declared cost
    # more clean draws weigh only for a randomized defense (the others draw their clean prediction once)
    assert unit_weight(clean, plain, clean_draws=8) == unit_weight(clean, plain)
    assert unit_weight(clean, Traits(randomized=True), clean_draws=8) > unit_weight(clean, plain)
