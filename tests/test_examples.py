"""The runnable examples under examples/ run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dent.evaluation.report import load_summary

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_defense_example_runs_through_the_harness(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "own_defense.py"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "own (own_defense:NoisyQuantizer bits=3 std=0.02)" in done.stdout
    summary = load_summary([tmp_path / "run"])
    rows = {row.defense: row for row in summary.rows}
    assert set(rows) == {"undefended", "own", "jpeg_dent"}
    for row in rows.values():
        assert row.natural.n == 16 and all(pr.worst.n == 16 for pr in row.attacks.values())


def test_calibrate_detector_example_prints_a_config_entry_that_builds(cifar10_dir):
    from dent.confbase import validated, parse_value
    from dent.evaluation.config import EvaluateConfig

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "calibrate_detector.py"), "--n-images", "20", "--fpr", "0.1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    entry = parse_value(done.stdout.splitlines()[1].split(":", 1)[1])
    config = validated(EvaluateConfig, {"defenses": {"squeezed": entry}})
    assert config.defenses["squeezed"].fpr == 0.1 and 0 <= config.defenses["squeezed"].threshold <= 2


def test_calibrate_detector_example_names_a_bad_argument():
    for args, message in [(["--n-images", "0"], "--n-images must be >= 1, got 0"), (["--fpr", "1.5"], "got 1.5"),
                          (["--bits", "0"], "--bits must be in 1..8"), (["--model", "nope"], "unknown model 'nope'")]:
        done = subprocess.run([sys.executable, str(EXAMPLES / "calibrate_detector.py"), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, args


def test_autoattack_on_dent_example_runs_at_a_tiny_budget(cifar10_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "autoattack_on_dent.py"), "--n-images", "8", "--steps", "1",
                           "--n-iter", "2", "--batch-size", "8", "--eps", "8/255"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if " of 8 images" in line]
    assert [line.split(":")[0] for line in lines] == ["clean", "APGD-CE + APGD-T"]
    clean, robust = (float(line.split(": ")[1].split("%")[0]) for line in lines)
    assert 0 <= robust <= clean <= 100


def test_autoattack_on_dent_example_names_a_bad_argument():
    for args, message in [(["--eps", "abc"], "--eps: expected a number or a fraction like 8/255, got 'abc'"),
                          (["--steps", "0"], "--steps must be >= 1, got 0"), (["--model", "nope"], "unknown model 'nope'")]:
        done = subprocess.run([sys.executable, str(EXAMPLES / "autoattack_on_dent.py"), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, args


def _run_example(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=EXAMPLES.parent)


def test_robustbench_model_example_runs_offline_with_random_weights(cifar10_dir):
    done = _run_example("robustbench_model.py", "--checkpoint", "random", "--n-images", "8")
    assert done.returncode == 0, done.stderr
    assert "| Wong2020Fast |" in done.stdout and "Natural dent" in done.stdout


def test_robustbench_model_example_without_its_checkpoint_says_where_to_get_it(tmp_path):
    env = {**os.environ, "DENT_MODEL_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(EXAMPLES / "robustbench_model.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "Wong2020Fast.pt" in done.stderr and "Traceback" not in done.stderr


def test_train_tiny_recipe_example_trains_exports_and_evaluates(cifar10_dir, tmp_path):
    done = _run_example("train_tiny_recipe.py", "--n-images", "64", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "trained pgd: finished at epoch 1" in done.stdout and "| resnet26_1 |" in done.stdout
    assert (tmp_path / "zoo" / "tiny_example.md").read_text().startswith("# tiny_example")
    bad = _run_example("train_tiny_recipe.py", "--recipe", "nope")
    assert bad.returncode == 2 and "unknown training recipe 'nope'" in bad.stderr and "Traceback" not in bad.stderr
