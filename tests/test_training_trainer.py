"""The training loop: bit-for-bit resume on CPU, checkpoints, config guards, schedule, early stop, logs."""

from __future__ import annotations

import json

import pytest
import torch

from dent.errors import ConfigError, DentError
from dent.training.config import Schedule
from dent.training.trainer import (
    CHECKPOINT_FILE, ResumeError, Trainer, carve_holdout, load_checkpoint, lr_factor, steps_per_epoch, train,
)
from training_support import build_tiny, builder_for, one_thread, synthetic_split, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def make(cfg, tmp_path, name="run", n=104, build=build_tiny):
    data = carve_holdout(synthetic_split(n), cfg.train)
    return Trainer(cfg, data, run_dir=tmp_path / name, build=build, console=False)


def build_with_dropout(arch: str) -> torch.nn.Module:
    """Dropout draws from the global torch RNG: resuming must restore it too."""
    return torch.nn.Sequential(torch.nn.Dropout(0.2), build_tiny(arch))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


RESUME_CASES = {
    "nominal": [],
    "nominal_dropout": ["train.augment", "false"],
    "fgsm_rs_early_stop": ["train.early_stop.enabled", "true", "train.schedule", "cyclic"],
    "dynat_inner": ["train.dynat.inner", "true", "train.attack.steps", "2", "train.dynat.guide_lr", "0.05"],
    "trades_l2_bn_train": ["train.attack.norm", "L2", "train.attack.eps", "0.5", "train.attack.steps", "2",
                           "train.attack.bn_mode", "train"],
    "pixelcnn_adam": ["train.optimizer", "adam", "train.lr", "0.01"],
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_interrupted_and_resumed_run_ends_with_the_same_weights(case, tmp_path):
    recipe = case.split("_early")[0].split("_inner")[0].split("_l2")[0].split("_dropout")[0].split("_adam")[0]
    build = build_with_dropout if "dropout" in case else builder_for(recipe)
    cfg = tiny_config(recipe, "train.epochs", "3", "train.batch_size", "16", *RESUME_CASES[case])
    full = make(cfg, tmp_path, "full", build=build).run()
    assert full.epoch == 3 and full.status == "finished"

    first = make(cfg, tmp_path, "split", build=build).run(until_epoch=1)
    assert first.epoch == 1 and first.status == "running"
    resumed = make(cfg, tmp_path, "split", build=build).run(resume=True)  # a fresh trainer, as after a crash
    assert resumed.epoch == 3 and resumed.status == "finished"

    assert_same_state(full.model.state_dict(), resumed.model.state_dict())
    for name in full.extras:
        assert_same_state(full.extras[name].state_dict(), resumed.extras[name].state_dict())
    ckpt_full = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)
    ckpt_split = load_checkpoint(tmp_path / "split" / CHECKPOINT_FILE)
    for (_, sa), (_, sb) in zip(ckpt_full["optimizer"]["state"].items(), ckpt_split["optimizer"]["state"].items()):
        assert sa.keys() == sb.keys()  # SGD's momentum buffers, Adam's moments and step counts
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    drop_times = lambda h: [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in h]  # noqa: E731
    assert drop_times(full.history) == drop_times(resumed.history)
    assert len(ckpt_split["invocations"]) == 2


def test_checkpoint_contents_logs_and_curves(tmp_path):
    cfg = tiny_config("pgd", "train.epochs", "2", "train.attack.steps", "2")
    result = make(cfg, tmp_path).run()
    run_dir = result.run_dir
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    for key in ("model", "optimizer", "scheduler", "extras", "rng", "epoch", "config_hash", "config", "history"):
        assert key in ckpt
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert ckpt["epoch"] == 2 and ckpt["recipe"] == "pgd"
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    for entry in history["epochs"]:
        assert {"train_loss", "clean_acc", "robust_acc", "lr", "epoch_time_s"} <= entry.keys()
        assert 0 <= entry["robust_acc"] <= entry["clean_acc"] <= 1
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch 2/2" in (run_dir / "train.log").read_text()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "provenance.json").is_file()
    assert not list(run_dir.glob("*.tmp"))  # atomic writes leave no temporaries


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    make(tiny_config("nominal", "train.epochs", "2"), tmp_path).run(until_epoch=1)
    other = tiny_config("nominal", "train.epochs", "2", "train.lr", "0.05")
    with pytest.raises(ResumeError) as err:
        make(other, tmp_path).run(resume=True)
    message = str(err.value)
    assert "train.lr" in message and "0.1" in message and "0.05" in message
    with pytest.raises(ResumeError, match="train.lr"):  # an explicit checkpoint path is checked the same way
        make(other, tmp_path, "elsewhere").run(resume=tmp_path / "run")


def test_existing_checkpoint_without_resume_and_missing_resume_path(tmp_path):
    cfg = tiny_config("nominal", "train.epochs", "2")
    make(cfg, tmp_path).run(until_epoch=1)
    with pytest.raises(ResumeError, match="--resume"):
        make(cfg, tmp_path).run()
    with pytest.raises(ResumeError, match="no checkpoint"):
        make(cfg, tmp_path, "b").run(resume=tmp_path / "nowhere")
    # train.resume in the config works like --resume; a finished run has nothing left to do
    cfg_resume = tiny_config("nominal", "train.epochs", "2", "train.resume", "true")
    assert make(cfg_resume, tmp_path).run().epoch == 2
    assert make(cfg_resume, tmp_path).run().epoch == 2
    # resume with no checkpoint yet starts from scratch
    assert make(cfg_resume, tmp_path, "fresh").run(until_epoch=1).epoch == 1


def test_resume_hash_ignores_volatile_keys(tmp_path):
    make(tiny_config("nominal", "train.epochs", "2"), tmp_path).run(until_epoch=1)
    cfg = tiny_config("nominal", "train.epochs", "2", "train.progress", "true", "train.resume", "true",
                      "output.root", str(tmp_path / "elsewhere"), "data.dir", str(tmp_path / "data"))
    assert make(cfg, tmp_path).run().epoch == 2


def test_until_epoch_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match="until_epoch"):
        make(tiny_config("nominal", "train.epochs", "2"), tmp_path).run(until_epoch=3)


def test_early_stop_on_catastrophic_overfitting_restores_previous_weights(tmp_path, monkeypatch):
    cfg = tiny_config("fgsm_rs", "train.epochs", "4", "train.early_stop.enabled", "true")
    trainer = make(cfg, tmp_path)
    accuracies = iter([0.6, 0.6, 0.7, 0.7, 0.1, 0.1, 0.1])  # (eval, check) per epoch; collapse at epoch 3
    saved = {}
    original_check = Trainer._check_overfitting

    def fake_evaluate(self, split):
        acc = next(accuracies)
        return 0.9, acc

    def spy_check(self, epoch, entry):
        if epoch == 2:
            saved["epoch2"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        original_check(self, epoch, entry)

    monkeypatch.setattr(Trainer, "_evaluate", fake_evaluate)
    monkeypatch.setattr(Trainer, "_check_overfitting", spy_check)
    result = trainer.run()
    assert result.status == "early_stopped" and result.epoch == 3
    assert result.history[-1]["early_stopped"] is True
    assert_same_state(result.model.state_dict(), saved["epoch2"])
    assert make(tiny_config("fgsm_rs", "train.epochs", "4", "train.early_stop.enabled", "true",
                            "train.resume", "true"), tmp_path).run().epoch == 3  # nothing left to do


@pytest.mark.parametrize("rule,stops", [("absolute", False), ("relative", True)])
def test_the_relative_early_stop_rule_fires_at_low_accuracy(rule, stops, tmp_path, monkeypatch):
    """12% -> 3% is catastrophic overfitting on a small model, yet a fall of only 0.09 points: the absolute rule
    (drop 0.2) cannot fire there, the relative one (drop 0.5: below half the previous accuracy) does."""
    cfg = tiny_config("fgsm_rs", "train.epochs", "3", "train.early_stop.enabled", "true",
                      "train.early_stop.rule", rule, "train.early_stop.drop", "0.5" if rule == "relative" else "0.2")
    accuracies = iter([0.12, 0.12, 0.03, 0.03, 0.03, 0.03])  # (eval, check) per epoch; collapse at epoch 2
    monkeypatch.setattr(Trainer, "_evaluate", lambda self, split: (0.5, next(accuracies)))
    result = make(cfg, tmp_path).run()
    assert (result.status, result.epoch) == (("early_stopped", 2) if stops else ("finished", 3))


def test_lr_schedules():
    total = 100
    assert lr_factor(Schedule.COSINE, 0, total) == 1.0
    assert lr_factor(Schedule.COSINE, 50, total) == pytest.approx(0.5)
    assert lr_factor(Schedule.COSINE, 100, total) == pytest.approx(0.0)
    cyc = [lr_factor(Schedule.CYCLIC, s, total, 0.4) for s in range(total)]
    assert max(cyc) == pytest.approx(1.0) and cyc.index(max(cyc)) == 39 and cyc[0] > 0 and cyc[-1] == 0
    assert [lr_factor(Schedule.PIECEWISE, s, total) for s in (0, 49, 50, 74, 75)] == [1, 1, 0.1, 0.1, 0.01]
    assert lr_factor(Schedule.CONSTANT, 77, total) == 1.0
    assert steps_per_epoch(41, 20) == 2 and steps_per_epoch(42, 20) == 3


def test_holdout_is_disjoint_fixed_and_stratified():
    full = synthetic_split(300)
    cfg = tiny_config("nominal", "train.holdout", "50", "train.n_images", "100")
    a, b = carve_holdout(full, cfg.train), carve_holdout(full, cfg.train)
    assert torch.equal(a.holdout.images, b.holdout.images) and torch.equal(a.train.images, b.train.images)
    assert len(a.holdout) == 50 and len(a.train) == 100
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [10] * 10
    hold = {tuple(img.flatten()[:8].tolist()) for img in a.holdout.images}
    assert not any(tuple(img.flatten()[:8].tolist()) in hold for img in a.train.images)
    with pytest.raises(ConfigError, match="holdout"):
        carve_holdout(full, tiny_config("nominal", "train.holdout", "250", "train.n_images", "100").train)


def test_divergence_is_a_clear_error(tmp_path):
    cfg = tiny_config("nominal", "train.lr", "1e30")
    with pytest.raises(DentError, match="train.lr"):
        make(cfg, tmp_path).run()


def test_train_function_with_injected_data(tmp_path):
    cfg = tiny_config("nominal")
    data = carve_holdout(synthetic_split(80), cfg.train)
    result = train(cfg, data=data, build=build_tiny, run_dir=tmp_path / "r", console=False)
    assert result.status == "finished"
