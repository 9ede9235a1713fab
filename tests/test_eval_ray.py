"""``evaluation.executor ray``: the same results as the local executor, a killed worker's unit retried and stored
once, a killed driver resumed with no unit duplicated or lost. A local Ray instance with 2 CPUs serves all tests
(the driver subprocesses join it by address); skipped without the optional ``ray`` extra."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from dent.errors import ConfigError
from dent.evaluation.config import EvaluateConfig, RaySection
from dent.evaluation.executors import local_instance_options, workers_that_fit
from dent.evaluation.runner import evaluate
from dent.evaluation.store import ResultStore
from dent.defenses.kinds import build_defense
from eval_support import fake_data, tiny_net, units_stored, wait_for_stored_units

TESTS = Path(__file__).resolve().parent
N = 24
OVERRIDES = [
    "device", "cpu", "data.n_images", str(N), "data.batch_size", "4", "evaluation.progress", "false",
    "attack.version", "custom", "attack.attacks", "[apgd-ce, apgd-t]", "attack.threats", "[Linf:16/255]",
    "attack.n_iter", "2", "attack.n_restarts", "1", "attack.n_target_classes", "1",
]
DEFENSES = {"defenses": {"static": {"steps": 0}, "dent": {"steps": 1, "lr": 0.01}}}
N_UNITS = 2 * (N // 4) * 2  # defenses x batches x (clean + 1 attack point)
ON_RAY = ["evaluation.executor", "ray", "evaluation.ray.workers", "2"]


def config(*extra: str) -> EvaluateConfig:
    return EvaluateConfig.load(None, OVERRIDES + list(extra), file_defaults=DEFENSES)


def stored_records(run_dir: Path):
    if not (run_dir / "results.sqlite").exists():
        return []
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        return list(store.records())


def results_by_key(run_dir: Path) -> dict[str, dict]:
    records = stored_records(run_dir)
    counts = Counter(r.key for r in records)
    assert max(counts.values()) == 1, "a unit stored twice"
    return {r.key: {k: v for k, v in r.result.items() if k != "notes"} for r in records}


@pytest.fixture(scope="module")
def model_and_data():
    net = tiny_net()
    return net, fake_data(N, model=net)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, model_and_data):
    net, data = model_and_data
    run_dir = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker of num_cpus 1: thread counts may change float sums
    try:
        evaluate(config(), model=net, data=data, run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)
    return results_by_key(run_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for the module; its workers import this folder's helpers."""
    ray = pytest.importorskip("ray", reason="the optional Ray extra is not installed: pip install -e '.[ray]'")
    ray.init(**local_instance_options(2),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                                       "OMP_NUM_THREADS": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_executor_stores_the_local_executors_results(ray_cluster, local_reference, model_and_data, tmp_path):
    net, data = model_and_data
    run = evaluate(config(*ON_RAY), model=net, data=data, run_dir=tmp_path / "ray")
    assert run.n_run == N_UNITS
    assert results_by_key(tmp_path / "ray") == local_reference
    log = (tmp_path / "ray" / "evaluate.log").read_text()
    assert "on host" in log and ", node " in log  # each unit's worker, host and node are logged


class StallsOnceThenPasses(nn.Module):
    """A defense whose first call anywhere writes its process id to ``marker`` and waits to be killed."""

    def __init__(self, defense: nn.Module, marker: str):
        super().__init__()
        self.defense, self.marker = defense, marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.defense(x)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(120)
        raise AssertionError("the worker should have been killed while it waited")


def stalling_factory(marker: str):
    def build(model, config):
        return StallsOnceThenPasses(build_defense(model, config), marker)
    return build


def kill_pid_when_written(marker: Path, killed: list) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_a_worker_killed_mid_unit_is_replaced_and_its_unit_stored_once(ray_cluster, local_reference,
                                                                       model_and_data, tmp_path):
    net, data = model_and_data
    marker, killed = tmp_path / "stalled.pid", []
    killer = threading.Thread(target=kill_pid_when_written, args=(marker, killed), daemon=True)
    killer.start()
    run = evaluate(config(*ON_RAY), model=net, data=data, run_dir=tmp_path / "ray",
                   defense_factory=stalling_factory(str(marker)))
    killer.join(timeout=5)
    assert killed and killed[0] != os.getpid()  # a worker process, not this driver
    assert run.n_run == N_UNITS
    assert results_by_key(tmp_path / "ray") == local_reference  # every unit once, as the local executor's
    assert "its Ray worker died" in (tmp_path / "ray" / "evaluate.log").read_text()


DRIVER = """
import sys
from pathlib import Path
from eval_support import fake_data, tiny_net, units_stored, wait_for_stored_units
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.runner import evaluate
from test_eval_ray import DEFENSES, N, ON_RAY, OVERRIDES

net = tiny_net()
cfg = EvaluateConfig.load(None, OVERRIDES + ON_RAY + ["evaluation.ray.address", sys.argv[2]], file_defaults=DEFENSES)
evaluate(cfg, model=net, data=fake_data(N, model=net), run_dir=Path(sys.argv[1]))
"""


def start_driver(run_dir: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir), address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_driver_killed_with_sigkill_resumes_with_no_unit_duplicated_or_lost(ray_cluster, local_reference,
                                                                              tmp_path):
    run_dir = tmp_path / "ray"
    driver = start_driver(run_dir, ray_cluster)
    wait_for_stored_units(driver, lambda: units_stored(run_dir), 3, timeout=300)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    at_kill = units_stored(run_dir)
    assert 3 <= at_kill < N_UNITS
    _, err = start_driver(run_dir, ray_cluster).communicate(timeout=600)
    assert results_by_key(run_dir) == local_reference, err.decode()[-3000:]
    assert "already stored (skipped)" in (run_dir / "evaluate.log").read_text()


def test_without_the_ray_package_the_executor_says_how_to_install_it(monkeypatch, model_and_data, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    net, data = model_and_data
    with pytest.raises(ConfigError, match=r"evaluation.executor.*pip install -e \"\.\[ray\]\""):
        evaluate(config(*ON_RAY), model=net, data=data, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is written


def test_the_workers_are_as_many_as_the_cluster_holds():
    section = RaySection(workers=4, num_cpus=1, num_gpus=0.25)
    assert workers_that_fit(section, {"CPU": 16.0, "GPU": 2.0}) == 4
    assert workers_that_fit(section, {"CPU": 3.0, "GPU": 2.0}) == 3
    assert workers_that_fit(section, {"CPU": 16.0, "GPU": 0.5}) == 2  # fractions pack workers on a GPU
    with pytest.raises(ConfigError, match=r"num_gpus 0.25.*0 GPUs"):
        workers_that_fit(section, {"CPU": 16.0})


def test_the_ray_evaluation_example_measures_identical_results(ray_cluster, tmp_path):
    example = TESTS.parent / "examples" / "ray_evaluation.py"
    done = subprocess.run([sys.executable, str(example), "--images", "16", "--workers", "2", "--address", ray_cluster,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| local", "| ray"))]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows), done.stdout
    assert "CPU capability" in done.stdout and "bare round trip" in done.stdout
