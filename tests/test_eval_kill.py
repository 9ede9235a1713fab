"""Results survive ``kill -9``: an evaluation killed part-way (twice) and resumed ends with exactly the
units and numbers of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


from dent.evaluation.report import load_summary
from dent.evaluation.store import ResultStore
from eval_support import units_stored, wait_for_stored_units

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import sys
from pathlib import Path
from eval_support import fake_data, tiny_net
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.runner import evaluate

overrides = [
    "device", "cpu", "data.n_images", "48", "data.batch_size", "4", "evaluation.progress", "false",
    "attack.version", "custom", "attack.attacks", "[apgd-ce, apgd-t]", "attack.threats", "[Linf:8/255, Linf:16/255]",
    "attack.n_iter", "2", "attack.n_restarts", "1", "attack.n_target_classes", "1",
]
cfg = EvaluateConfig.load(None, overrides, file_defaults={"defenses": {"static": {"steps": 0}, "dent": {"steps": 1, "lr": 0.01}}})
net = tiny_net()
evaluate(cfg, model=net, data=fake_data(48, model=net), run_dir=Path(sys.argv[1]))
"""
N_UNITS = 2 * 12 * 3  # defenses x batches x (clean + 2 attack points)


def start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after(run_dir: Path, at_least: int, timeout: float = 240) -> int:
    """Start the evaluation, SIGKILL it once ``at_least`` units are stored; return the count at the kill."""
    proc = start(run_dir)
    wait_for_stored_units(proc, lambda: units_stored(run_dir), at_least, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return units_stored(run_dir)


def finish(run_dir: Path) -> None:
    proc = start(run_dir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


def units(run_dir: Path):
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        return list(store.records())


def numbers(run_dir: Path):
    out = {}
    for row in load_summary([run_dir]).rows:
        out[(row.defense, "natural")] = (row.natural.correct, row.natural.n)
        for label, pr in row.attacks.items():
            out[(row.defense, label)] = (pr.worst.correct, pr.worst.n)
    return out


def test_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    finish(reference)

    run = tmp_path / "killed"
    first = kill_after(run, at_least=3)
    assert 3 <= first < N_UNITS
    second = kill_after(run, at_least=first + 5)  # resumes, then is killed again
    assert first + 5 <= second < N_UNITS
    finish(run)

    got, want = units(run), units(reference)
    assert len(got) == len(want) == N_UNITS
    keys = Counter(r.key for r in got)
    assert max(keys.values()) == 1  # no duplicated unit
    assert set(keys) == {r.key for r in want}  # no missing or foreign unit
    # every point evaluated exactly once per defense, kind and attack point
    coverage = Counter((r.defense, r.kind, r.attack, p) for r in got for p in r.result["positions"])
    assert set(coverage.values()) == {1} and len(coverage) == 2 * 3 * 48
    # identical per-point results, hence identical final numbers
    by_key = {r.key: r.result for r in want}
    for r in got:
        assert r.result["robust" if r.kind == "attack" else "clean_pred"] == \
            by_key[r.key]["robust" if r.kind == "attack" else "clean_pred"]
    assert numbers(run) == numbers(reference)
    log = (run / "evaluate.log").read_text()
    assert "already stored (skipped)" in log
