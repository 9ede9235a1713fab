"""No traceback, whatever the file system or the caller does (issue #12, section 5).

Each fault a user can cause (an output location that cannot be written, a store that is not dent's, a
config file that is not text, a config or images of the wrong kind from Python) ends in a DentError whose
message names the path or value and what was expected; on the command line, in exit status 2. The tests
run as root too: read-only locations are simulated by ``os.access`` (which is what dent consults, and what
reports EROFS even to root), full disks are real (/dev/full, SQLite's page limit).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from dent.cli.main import main
from dent.defenses import Dent, DentConfig
from dent.errors import ConfigError, CorruptFileError, InvalidInputError, OutputError
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.runner import evaluate
from dent.evaluation.store import STORE_NAME, ResultStore, UnitRecord
from dent.training.trainer import atomic_torch_save, carve_holdout, train
from eval_support import FakeSplit, fake_data, tiny_net, write_fake_cifar10
from training_support import build_tiny, synthetic_split, tiny_config

FAST = [
    "device", "cpu", "data.n_images", "4", "data.batch_size", "4", "evaluation.progress", "false",
    "evaluation.report", "false", "attack.version", "custom", "attack.attacks", "[apgd-ce]", "attack.n_iter", "1",
    "attack.n_restarts", "1",
]


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI; its exit code and stderr (an exception other than DentError fails the test)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, *fragments: object) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def fast_config(*overrides: str) -> EvaluateConfig:
    return EvaluateConfig.load(None, [*FAST, *overrides], file_defaults={"defenses": {"static": {"steps": 0}}})


def read_only(monkeypatch, *roots: Path) -> None:
    """Make ``os.access`` deny writing below ``roots``, as on a read-only mount."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        below = any(Path(path).resolve().is_relative_to(root.resolve()) for root in roots)
        return False if below and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"))


def evaluate_args(cifar: Path, root: Path, name: str = "run") -> list[object]:
    """A `dent evaluate` whose faults here all arise before a model is loaded."""
    return ["evaluate", *FAST, "model.arch", "resnet26_1", "data.dir", cifar, "output.root", root, "output.name", name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    net = tiny_net()
    evaluate(fast_config(), model=net, data=fake_data(8, model=net), run_dir=run_dir)
    return run_dir


@pytest.fixture
def finished_run(finished, tmp_path) -> Path:
    """A copy of a small finished run directory (tiny model, random data), for this test alone."""
    return Path(shutil.copytree(finished, tmp_path / "finished"))


def foreign_sqlite(path: Path, schema: str = "CREATE TABLE notes (body TEXT)") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(schema)
    return path


# -- output locations -----------------------------------------------------------------------------------
def test_output_root_below_a_regular_file(capsys, cifar, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = cli(capsys, *evaluate_args(cifar, blocker / "runs"))
    assert_clean_error(code, err, f"{blocker} is a file, not a directory", "output.root")
    for command in ("bench", "accuracy"):
        code, err = cli(capsys, command, "output.root", blocker / "runs", "model.arch", "resnet26_1_nominal",
                        "data.dir", cifar, "data.n_images", "4", "device", "cpu")
        assert_clean_error(code, err, f"{blocker} is a file, not a directory")


def test_output_root_not_writable(capsys, cifar, tmp_path, monkeypatch):
    read_only(monkeypatch, tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    code, err = cli(capsys, *evaluate_args(cifar, tmp_path / "ro"))
    assert_clean_error(code, err, f"run directory {tmp_path / 'ro' / 'run'} is read-only", "output.root")
    assert not (tmp_path / "ro" / "run" / STORE_NAME).exists()


def test_evaluate_into_a_read_only_run_directory_says_so(capsys, cifar, finished_run, monkeypatch):
    before = digest(finished_run)
    read_only(monkeypatch, finished_run)
    code, err = cli(capsys, *evaluate_args(cifar, finished_run.parent, finished_run.name))
    assert_clean_error(code, err, f"run directory {finished_run} is read-only")
    assert "corrupt" not in err and "not a dent results store" not in err
    assert digest(finished_run) == before


def test_full_disk_while_writing_the_run_files(capsys, cifar, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.hash").symlink_to("/dev/full")  # writes there fail with ENOSPC, also for root
    code, err = cli(capsys, *evaluate_args(cifar, tmp_path))
    assert_clean_error(code, err, f"cannot write run directory {run_dir}", "No space left on device", "output.root")


def test_report_of_a_read_only_run_directory(capsys, finished_run, tmp_path, monkeypatch):
    before = digest(finished_run)
    read_only(monkeypatch, finished_run)
    code, err = cli(capsys, "report", finished_run, "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "report.md").is_file()
    assert digest(finished_run) == before  # nothing written, not even SQLite's side files
    code, err = cli(capsys, "report", finished_run)  # the default output is inside the run directory
    assert_clean_error(code, err, f"report directory {finished_run / 'report'} is read-only", "--out")


def test_report_out_that_cannot_be_a_directory(capsys, finished_run, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = cli(capsys, "report", finished_run, "--out", blocker)
    assert_clean_error(code, err, f"report directory {blocker} is a file; expected a directory")
    code, err = cli(capsys, "report", finished_run, "--out", blocker / "report")
    assert_clean_error(code, err, f"{blocker} is a file, not a directory", "--out")


def test_dent_train_output_directory_below_a_file(capsys, tmp_path, monkeypatch):
    from dent.training import trainer

    monkeypatch.setattr(trainer, "prepare_data", lambda cfg: carve_holdout(synthetic_split(60), cfg.train))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = cli(capsys, "train", "model.arch", "resnet26_1", "device", "cpu", "train.holdout", "20",
                    "train.batch_size", "20", "output.root", blocker / "runs")
    assert_clean_error(code, err, f"training run directory {blocker / 'runs'}", f"{blocker} is a file", "output.root")


def test_full_disk_while_saving_a_training_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1}, path)
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(OutputError, match="No space left on device") as err:
        atomic_torch_save({"epoch": 2}, path)
    assert str(path) in str(err.value) and "previous checkpoint is kept" in str(err.value)
    assert torch.load(path, weights_only=True) == {"epoch": 1}


# -- results stores -------------------------------------------------------------------------------------
def test_a_sqlite_file_that_is_not_a_dent_store_is_refused_and_left_alone(capsys, cifar, tmp_path):
    store = foreign_sqlite(tmp_path / "run" / STORE_NAME)
    before = store.read_bytes()
    code, err = cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "report")
    assert_clean_error(code, err, f"{store} is not a dent results store", "notes")
    code, err = cli(capsys, *evaluate_args(cifar, tmp_path))
    assert_clean_error(code, err, f"{store} is not a dent results store")
    assert store.read_bytes() == before  # no dent tables were added to someone else's database


def test_dent_tables_with_other_columns_are_refused(tmp_path):
    store = foreign_sqlite(tmp_path / STORE_NAME, "CREATE TABLE meta (key TEXT)")
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE units (key TEXT)")
    with pytest.raises(CorruptFileError, match="its table 'meta' lacks the columns value"):
        ResultStore(store, create=False)


def test_a_file_that_is_not_sqlite(capsys, cifar, tmp_path):
    store = tmp_path / "run" / STORE_NAME
    store.parent.mkdir()
    store.write_bytes(b"not a database\n" * 100)
    for argv in (["report", tmp_path / "run"], evaluate_args(cifar, tmp_path)):
        code, err = cli(capsys, *argv)
        assert_clean_error(code, err, f"{store} is not a dent results store", "file is not a database")


def test_a_directory_where_the_store_should_be(capsys, cifar, tmp_path):
    (tmp_path / "run" / STORE_NAME).mkdir(parents=True)
    code, err = cli(capsys, *evaluate_args(cifar, tmp_path))
    assert_clean_error(code, err, f"{tmp_path / 'run' / STORE_NAME} is a directory; expected a results store file")


def test_reading_a_store_writes_nothing(finished_run, tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(CorruptFileError, match="empty SQLite database"):
        ResultStore(empty, create=False)
    assert empty.stat().st_size == 0
    before = digest(finished_run)
    with ResultStore(finished_run / STORE_NAME, create=False) as store:
        record = next(store.records())
        with pytest.raises(OutputError, match="read-only"):  # the connection is read-only, even for root
            store.put(UnitRecord(**{**record.__dict__, "key": "another"}))
    assert digest(finished_run) == before  # no side files (-shm, -wal) left beside the store


def test_a_full_disk_keeps_the_finished_units(tmp_path):
    path = tmp_path / STORE_NAME
    record = UnitRecord(key="k0", config_hash="h", kind="clean", defense="static", attack=None, batch_size=1,
                        batch_index=0, spec={}, result={"positions": [0]}, seconds=0.0, device="cpu")
    with ResultStore(path) as store:
        store.put(record)
        # A real SQLITE_FULL on the next growth of the file (through the private connection: no API sets it).
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        big = UnitRecord(**{**record.__dict__, "key": "k1", "spec": {"pad": "x" * 100_000}})
        with pytest.raises(OutputError) as err:
            store.put(big)
    assert str(path) in str(err.value) and "disk is full" in str(err.value)
    assert "units finished before are kept" in str(err.value)
    with ResultStore(path, create=False) as store:
        assert [r.key for r in store.records()] == ["k0"]


# -- config files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
    ("model:\n  arch: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 18)"),
])
def test_a_config_file_that_is_not_text(capsys, tmp_path, content, expected):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    code, err = cli(capsys, "models", "--cfg", path)
    assert_clean_error(code, err, str(path), expected, "expected a YAML file")


def test_a_config_path_that_is_a_directory(capsys, tmp_path):
    code, err = cli(capsys, "evaluate", "--cfg", tmp_path)
    assert_clean_error(code, err, str(tmp_path), "is a directory; expected a YAML file")


# -- the Python API ---------------------------------------------------------------------------------------
def test_evaluate_accepts_a_plain_dict_config(tmp_path):
    cfg = fast_config()
    net = tiny_net()
    data = fake_data(4, model=net)
    from_dict = evaluate(cfg.to_dict(), model=net, data=data, run_dir=tmp_path / "dict")
    assert from_dict.n_run > 0
    assert from_dict.config_hash == evaluate(cfg, model=net, data=data, run_dir=tmp_path / "config").config_hash


@pytest.mark.parametrize("call, expected", [
    (lambda: evaluate({"data": {"n_imagez": 4}}), "unknown config key 'data.n_imagez'"),
    (lambda: evaluate("cfgs/main.yaml"), "evaluate(cfg): expected a dent.evaluation.config.EvaluateConfig or a dict"),
    (lambda: train({"train": {"epochs": 0}}), "config key 'train.epochs'"),
    (lambda: train(["model.arch", "tiny"]), "train(cfg): expected a dent.training.config.TrainConfig"),
    (lambda: Dent(tiny_net(), {"stepz": 1}), "unknown config key 'stepz'"),
    (lambda: Dent(tiny_net(), 10), "Dent(config): expected a dent.defenses.config.DentConfig"),
])
def test_a_config_of_the_wrong_kind(call, expected):
    with pytest.raises(ConfigError) as err:
        call()
    assert expected in str(err.value)


def test_bench_accepts_a_dict_and_refuses_other_types():
    from dent.benchmark.runner import Bench

    assert Bench({"bench": {"device": "cpu"}}).b.device == "cpu"
    with pytest.raises(ConfigError, match=r"Bench\(cfg\): expected a dent.benchmark.config.BenchConfig"):
        Bench(42)


def test_dent_accepts_a_dict_config():
    net, x = tiny_net(), torch.rand(4, 3, 8, 8)
    torch.manual_seed(0)
    expected = Dent(net, DentConfig(steps=2))(x)
    torch.manual_seed(0)
    assert torch.equal(Dent(net, {"steps": 2})(x), expected)


def test_images_with_the_wrong_channel_count(tmp_path):
    net = tiny_net()
    gray = FakeSplit(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="expects 3-channel images, got 1 channel"):
        evaluate(fast_config(), model=net, data=gray, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    for steps in (0, 1):
        with pytest.raises(InvalidInputError, match=r"expects 3-channel images, got 1 channel\(s\) .*\[2, 1, 8, 8\]"):
            Dent(net, DentConfig(steps=steps))(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("data, expected", [
    (torch.rand(4, 3, 8, 8), "expected an object with tensors .images [N, C, H, W] and .labels [N]"),
    (FakeSplit(torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long)), "images must be a float tensor [N, C, H, W]"),
    (FakeSplit(torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long)), "labels must be an integer tensor [4]"),
])
def test_evaluation_data_of_the_wrong_kind(tmp_path, data, expected):
    with pytest.raises(InvalidInputError) as err:
        evaluate(fast_config(), model=tiny_net(), data=data, run_dir=tmp_path / "run")
    assert expected in str(err.value)


def test_a_model_that_is_not_a_module():
    with pytest.raises(InvalidInputError, match=r"Dent\(model\): expected a torch.nn.Module .*got dict"):
        Dent({"conv": 1})


def test_train_with_a_run_directory_below_a_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cfg = tiny_config("nominal")
    data = carve_holdout(synthetic_split(60), cfg.train)
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a directory"):
        train(cfg, data=data, build=build_tiny, run_dir=blocker / "run", console=False)


def test_export_to_a_directory_below_a_file(tmp_path):
    from dent.training.export import export_reference_checkpoint
    cfg = tiny_config("nominal")
    train(cfg, data=carve_holdout(synthetic_split(60), cfg.train), build=build_tiny, run_dir=tmp_path / "run",
          console=False)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"export directory {blocker / 'ref'}: {blocker} is a file") as err:
        export_reference_checkpoint(tmp_path / "run", "tiny_ref", directory=blocker / "ref")
    assert "--export-dir" in str(err.value)


def test_a_damaged_store(capsys, finished_run):
    store = finished_run / STORE_NAME
    data = bytearray(store.read_bytes())
    page = 4096
    data[page:] = b"\xff" * (len(data) - page)  # every page after the first (schema) page
    store.write_bytes(bytes(data))
    code, err = cli(capsys, "report", finished_run, "--out", finished_run / "out")
    assert_clean_error(code, err, f"results store {store} is damaged", "malformed")
