"""Optional experiment tracking: dent train and dent evaluate mirror their config and metrics into TensorBoard."""

from __future__ import annotations

import builtins

import pytest

from dent.errors import ConfigError
from dent.tracking import TRACKING_DIR, Tracking, open_tracker
from training_support import build_tiny, one_thread, synthetic_split, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TRACKING_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_logs_every_epoch_s_metrics_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional `tracking` extra is not installed")
    from dent.training.trainer import Trainer, carve_holdout

    cfg = tiny_config("nominal", "train.epochs", "2", "output.tracking", "tensorboard")
    result = Trainer(cfg, carve_holdout(synthetic_split(104), cfg.train), run_dir=tmp_path / "run", build=build_tiny,
                     console=False).run()
    logged = scalars(result.run_dir)
    assert [step for step, _ in logged["train/train_loss"]] == [1, 2]
    for (_, value), entry in zip(logged["train/train_loss"], result.history):
        assert value == pytest.approx(entry["train_loss"], rel=1e-6)
    assert [v for _, v in logged["train/clean_acc"]] == pytest.approx([e["clean_acc"] for e in result.history])


def test_evaluation_logs_its_table_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional `tracking` extra is not installed")
    from dent.evaluation.api import benchmark_defenses
    from eval_support import tiny_net, write_fake_cifar10

    results = benchmark_defenses(
        tiny_net(), defenses={"static": {"steps": 0}, "dent": {"steps": 1}},
        attack={"version": "custom", "attacks": ["apgd-ce"], "n_iter": [2], "n_restarts": 1}, n_images=8,
        batch_size=8, data={"dir": str(write_fake_cifar10(tmp_path / "data"))}, evaluation={"progress": False},
        device="cpu", output={"tracking": "tensorboard"}, run_dir=tmp_path / "ev")
    logged = scalars(tmp_path / "ev")
    assert logged["accuracy/static/clean"][0][1] == pytest.approx(results.accuracy("static"))
    attack = next(a for a in results.to_dict()["attack"] if a)
    assert logged[f"accuracy/dent/{attack}/worst case"][0][1] == pytest.approx(results.accuracy("dent", attack))


def test_tensorboard_tracking_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install -e \"\.\[tracking\]\""):
        open_tracker(Tracking.TENSORBOARD, tmp_path)
    open_tracker(Tracking.NONE, tmp_path).log_scalars(0, {"x": 1.0})  # no-op, no package needed
