"""``dent train`` under torchrun: 2 CPU processes (gloo) against one process, resume after a SIGKILL, rank 0's files.

The distributed runs are started by ``torch.multiprocessing.spawn`` with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on a free port of 127.0.0.1); each spawn runs
several tiny trainings in a row, since starting the processes costs more than training.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch import nn

from dent.errors import ConfigError
from dent.training.distributed import World, backend_for, rank_device, world_from_env
from dent.training.config import Backend
from dent.training.trainer import CHECKPOINT_FILE, ResumeError, Trainer, carve_holdout, load_checkpoint, train
from training_support import build_tiny, build_tiny_pixelcnn, one_thread, synthetic_split, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

#: 69 training images in global batches of 16: four batches and a last one of 5, split 3 + 2 between the ranks
N_IMAGES = 109


def build_plain(arch: str) -> nn.Module:
    """A classifier without BatchNorm: the same function of its batch whatever the shards."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(128, 10))


def build_dropout(arch: str) -> nn.Module:
    """BatchNorm and dropout (the global RNG of each rank)."""
    return nn.Sequential(nn.Dropout(0.2), build_tiny(arch))


BUILDERS = {"plain": build_plain, "bn": build_tiny, "dropout": build_dropout, "pixelcnn": build_tiny_pixelcnn}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1 that are free now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_job(job: dict, root: Path) -> None:
    """One training of a spawned rank (or of this process): ``job`` names the recipe, overrides, model, run."""
    cfg = tiny_config(job["recipe"], "train.batch_size", "16", *job.get("overrides", []))
    data = carve_holdout(synthetic_split(N_IMAGES), cfg.train)
    train(cfg, data=data, build=BUILDERS[job["build"]], run_dir=root / job["name"], console=False,
          until_epoch=job.get("until"), resume=job.get("resume"))


def _rank(rank: int, world: int, ports: list[int], jobs: list[dict], root: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for job, port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)  # each training makes its own process group, on its own port
        if job.get("kill_after") is not None and rank == 0:
            _kill_after(job["kill_after"])
        run_job(job, root)


def _kill_after(epoch: int) -> None:
    """SIGKILL this process once it has written the checkpoint and logs of ``epoch``: a crash, not a clean stop."""
    write = Trainer._write_log_files

    def write_then_die(self):
        write(self)
        if self.state.epoch == epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._write_log_files = write_then_die


def spawn(jobs: list[dict], root: Path, world: int = 2) -> None:
    mp.spawn(_rank, args=(world, free_ports(len(jobs)), jobs, root), nprocs=world, join=True)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / CHECKPOINT_FILE)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ---------------------------------------------------------------------------------------------------
# Two processes compute what one does


#: Runs of 2 epochs (10 steps) whose 2-process model must equal the 1-process model: no BatchNorm, no random
#: attack starts; augmentation, the uneven last batch, AWP, DYNAT's guide, double backpropagation, a teacher and
#: the density model's held-out evaluation included.
SAME = {
    "nominal": ("nominal", "plain", []),
    "pgd_awp": ("pgd", "plain", ["train.attack.random_start", "false", "train.attack.steps", "2",
                                 "train.awp.gamma", "0.01"]),
    "dynat": ("dynat", "plain", ["train.attack.random_start", "false", "train.attack.steps", "1"]),
    "gradient_penalty": ("gradient_penalty", "plain", ["train.lr", "0.05"]),
    "distillation": ("distillation", "plain", ["train.distillation.teacher", "TEACHER", "train.lr", "0.5"]),
    "pixelcnn": ("pixelcnn", "pixelcnn", ["train.optimizer", "adam", "train.lr", "0.01"]),
}
#: Runs that differ on purpose: BatchNorm normalizes each rank's shard by its own statistics, and each rank
#: draws its attack random starts from its own generator (seed, epoch, rank).
DIFFERENT = {
    "batchnorm": ("nominal", "bn", []),
    "random_start": ("pgd", "plain", ["train.attack.steps", "2"]),
}


def test_two_processes_train_the_model_of_one_process(tmp_path):
    teacher = tmp_path / "teacher"
    run_job({"recipe": "temperature", "build": "plain", "name": "teacher", "overrides": ["train.epochs", "1"]}, tmp_path)
    jobs = []
    for name, (recipe, build, overrides) in {**SAME, **DIFFERENT}.items():
        overrides = [str(teacher) if o == "TEACHER" else o for o in overrides]
        job = {"recipe": recipe, "build": build, "overrides": ["train.epochs", "2", *overrides]}
        jobs.append({**job, "name": f"{name}-2"})
        run_job({**job, "name": f"{name}-1"}, tmp_path)
    spawn(jobs, tmp_path)

    for name in SAME:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        assert max_difference(weights(one), weights(two)) < 1e-5, name
        h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
        assert (h1["world_size"], h2["world_size"]) == (1, 2)
        for e1, e2 in zip(h1["epochs"], h2["epochs"]):  # the epoch's loss is of the global batches
            measured = [k for k in ("train_loss", "clean_acc", "heldout_bits_per_dim") if e1.get(k) is not None]
            assert [e2[k] for k in measured] == pytest.approx([e1[k] for k in measured], rel=1e-4), name
    for name in DIFFERENT:
        assert max_difference(weights(tmp_path / f"{name}-1"), weights(tmp_path / f"{name}-2")) > 1e-4, name

    run = tmp_path / "nominal-2"  # rank 0 alone wrote the files
    assert load_checkpoint(run / CHECKPOINT_FILE)["world_size"] == 2
    assert json.loads((run / "provenance.json").read_text())["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert (run / "train.log").read_text().count("epoch 2/2") == 1
    assert (run / "curves.png").is_file() and not list(run.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# Resume: bit for bit after a clean stop and after a SIGKILL


RESUME = {
    "fgsm_rs_early_stop_dropout": ("fgsm_rs", "dropout", ["train.early_stop.enabled", "true", "train.schedule",
                                                          "cyclic"]),
    "dynat_inner": ("dynat", "bn", ["train.dynat.inner", "true", "train.attack.steps", "2"]),
    "trades_awp_l2_bn_train": ("trades", "bn", ["train.attack.norm", "L2", "train.attack.eps", "0.5",
                                                "train.attack.steps", "2", "train.attack.bn_mode", "train",
                                                "train.awp.gamma", "0.01"]),
}
KILLED = "trades_awp_l2_bn_train"  # its first part dies by SIGKILL after epoch 1; the others stop at --until-epoch 1


def test_a_killed_two_process_run_resumes_bit_for_bit(tmp_path):
    full, split, resumed = [], [], []
    for name, (recipe, build, overrides) in RESUME.items():
        job = {"recipe": recipe, "build": build, "overrides": ["train.epochs", "2", *overrides]}
        full.append({**job, "name": f"{name}-full"})
        first = {"kill_after": 1} if name == KILLED else {"until": 1}
        split.append({**job, "name": f"{name}-split", **first})
        resumed.append({**job, "name": f"{name}-split", "resume": True})
    with pytest.raises(ProcessException):  # rank 0 killed; rank 1 fails or is terminated by spawn
        spawn(full + sorted(split, key=lambda j: "kill_after" in j), tmp_path)  # the killed one last
    assert load_checkpoint(tmp_path / f"{KILLED}-split" / CHECKPOINT_FILE)["epoch"] == 1
    spawn(resumed, tmp_path)

    for name in RESUME:
        a = load_checkpoint(tmp_path / f"{name}-full" / CHECKPOINT_FILE)
        b = load_checkpoint(tmp_path / f"{name}-split" / CHECKPOINT_FILE)
        assert (a["epoch"], a["status"]) == (b["epoch"], b["status"]) == (2, "finished"), name
        for part in ("model", "extras"):
            flat_a, flat_b = _flat(a[part]), _flat(b[part])
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), (name, part)
        drop_times = lambda h: [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in h]  # noqa: E731
        assert drop_times(a["history"]) == drop_times(b["history"]), name
        assert len(b["invocations"]) == 2 and len(b["rank_rng"]) == 2


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------------
# The world, its configuration and its errors (no processes)


def test_shards_split_a_batch_evenly_and_weight_the_loss():
    worlds = [World(rank, 3) for rank in range(3)]
    for n in (3, 5, 16):
        parts = [w.shard(n) for w in worlds]
        assert [p.start for p in parts] == [0, parts[0].stop, parts[1].stop] and parts[-1].stop == n
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert sum(w.loss_weight(s, n) for w, s in zip(worlds, sizes)) / 3 == pytest.approx(1)
    assert World().shard(7) == slice(0, 7) and World().loss_weight(7, 7) == 1
    from dent.training.trainer import steps_per_epoch

    assert steps_per_epoch(69, 16, 2) == 5 and steps_per_epoch(67, 16, 2) == 4 and steps_per_epoch(66, 16) == 5


def test_the_global_batch_must_split_over_the_ranks():
    with pytest.raises(ConfigError, match=r"train.batch_size 20 is the global batch.*world size 3.*18 or 21"):
        World(0, 3).per_rank_batch(20)
    assert World(1, 4).per_rank_batch(32) == 8


@pytest.mark.parametrize("environ,message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT not set: start distributed training with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 in the environment: expected 0..1"),
])
def test_a_bad_torchrun_environment_is_a_clear_error(environ, message):
    with pytest.raises(ConfigError, match=message):
        world_from_env(environ)


def test_world_from_the_environment_and_the_backend():
    assert world_from_env({}) == World() and world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World()
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert world_from_env(env) == World(3, 4, 1)
    cpu = torch.device("cpu")
    assert backend_for(Backend.AUTO, cpu) == "gloo" and backend_for(Backend.AUTO, torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ConfigError, match="backend nccl needs CUDA"):
        backend_for(Backend.NCCL, cpu)
    assert rank_device("cpu", World(1, 2)) == cpu
    assert tiny_config("nominal", "train.distributed.backend", "gloo").train.distributed.backend is Backend.GLOO


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    cfg = tiny_config("nominal", "train.epochs", "2")
    data = carve_holdout(synthetic_split(80), cfg.train)
    Trainer(cfg, data, run_dir=tmp_path / "r", build=build_tiny, console=False).run(until_epoch=1)
    ckpt = torch.load(tmp_path / "r" / CHECKPOINT_FILE, weights_only=True)
    torch.save({**ckpt, "world_size": 2}, tmp_path / "r" / CHECKPOINT_FILE)
    with pytest.raises(ResumeError, match=r"trained by 2 process\(es\), this run has 1.*Resume with 2"):
        Trainer(cfg, data, run_dir=tmp_path / "r", build=build_tiny, console=False).run(resume=True)


def test_what_has_no_distributed_form_is_refused_under_torchrun(monkeypatch, capsys):
    from dent.cli.main import main

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--cfg", "cfgs/train/detector_kde_resnet18.yaml"]) == 2
    assert "train.recipe kde_detector (fitting a detector" in capsys.readouterr().err
    assert main(["train", "--cfg", "cfgs/train/nominal.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "dent train --dry-run" in err and "run it without torchrun" in err


@pytest.mark.slow
def test_torchrun_runs_dent_train_and_rank_0_reports(tmp_path, cifar10_dir):
    """The launcher and the entry point of the docs: ``torchrun -m dent.cli.main train``, stopped and resumed."""
    def torchrun(*words: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_ports(1)[0]), "-m", "dent.cli.main", "train",
                   "--cfg", "cfgs/train/cpu_pgd_at_resnet26_1.yaml", "output.root", str(tmp_path), "output.name", "r",
                   "train.n_images", "64", "train.holdout", "16", "train.epochs", "2", "train.eval.steps", "1",
                   "train.progress", "false", "data.dir", str(cifar10_dir), *words]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    bad = torchrun("train.batch_size", "33")
    assert bad.returncode != 0 and "train.batch_size 33 is the global batch" in bad.stderr
    first = torchrun("train.batch_size", "32", "--until-epoch", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("running at epoch 1/2") == 1  # rank 0 alone prints
    second = torchrun("train.batch_size", "32", "--resume")
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("finished at epoch 2/2") == 1
    ckpt = load_checkpoint(tmp_path / "r" / CHECKPOINT_FILE)
    assert ckpt["world_size"] == 2 and [i["world_size"] for i in ckpt["invocations"]] == [2, 2]
