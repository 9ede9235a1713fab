"""``dent train`` on the command line, its config errors, and exporting a run as a reference checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dent.cli.main import main
from dent.training.export import ExportError, export_reference_checkpoint
from dent.training.trainer import Trainer, carve_holdout, default_builder, train
from eval_support import tiny_net
from training_support import build_tiny, one_thread, synthetic_split, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CFG_FILES = sorted(p.stem for p in Path("cfgs/train").glob("*.yaml"))
#: The recipe of each config whose name does not start with it (a config is named after its recipe otherwise).
RECIPE_OF = {"cpu_pgd_at_resnet26_1": "pgd", "cpu_pgd2_resnet26_1": "pgd", "cpu_awp_pgd_resnet26_1": "pgd",
             "cpu_awp_trades_resnet26_1": "trades", "cpu_dynat_inner_resnet26_1": "dynat", "pgd_awp": "pgd",
             "cpu_dcn_resnet26_1": "gradient_penalty", "cpu_distill_teacher_resnet26_1": "temperature",
             "cpu_distill_student_resnet26_1": "distillation", "detector_kde_resnet18": "kde_detector",
             "detector_subnetwork_resnet18": "subnetwork_detector", "pixelcnn_cifar10": "pixelcnn"}


@pytest.mark.parametrize("name", CFG_FILES)
def test_shipped_configs_load(name):
    from dent.training.config import TrainConfig

    cfg = TrainConfig.load(f"cfgs/train/{name}.yaml")
    expected = RECIPE_OF.get(name, name.replace("cpu_", "").replace("_resnet26_1", "").replace("_l2", ""))
    assert cfg.train.recipe == expected


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.recipe", "madry"], ["unknown training recipe 'madry'", "pgd", "trades", "dynat"]),
        (["train.attack.eps", "8"], ["train.attack.eps", "Linf epsilon 8", "8/255"]),
        (["train.attack.norm", "L2", "train.attack.eps", "80"], ["train.attack.eps", "L2 epsilon 80"]),
        (["train.eval.eps=-1/255"], ["eval.eps", "> 0"]),
        (["train.attack.eps", "0"], ["train.attack.eps", "> 0"]),
        (["train.schedul", "cosine"], ["unknown config key 'train.schedul'"]),
    ],
)
def test_bad_config_is_a_clear_error(overrides, expected, capsys):
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_cli_trains_resumes_and_refuses_another_config(tmp_path, capsys, cifar10_dir):
    common = ["--cfg", "cfgs/train/cpu_fgsm_rs_resnet26_1.yaml", "output.root", str(tmp_path), "output.name", "r",
              "train.n_images", "48", "train.holdout", "16", "train.batch_size", "16", "train.epochs", "2",
              "train.eval.steps", "1", "train.progress", "false", "data.dir", str(cifar10_dir)]
    code = main(["train", *common, "--until-epoch", "1"])
    assert code == 0, capsys.readouterr().err
    assert "running at epoch 1/2" in capsys.readouterr().out
    assert main(["train", *common]) == 2  # a checkpoint exists: --resume is required
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *common, "train.lr", "0.05", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another training config" in err and "train.lr" in err
    assert main(["train", *common, "--resume", "--export", "cli_ref", "--export-dir", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    assert "finished at epoch 2/2" in out and "exported" in out
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert (tmp_path / "zoo" / "cli_ref.safetensors").is_file()
    card = (tmp_path / "zoo" / "cli_ref.md").read_text()
    assert "dent train --cfg cfgs/train/cpu_fgsm_rs_resnet26_1.yaml" in card and "--resume" in card


def test_a_density_model_recipe_refuses_the_early_stop_it_cannot_check(capsys):
    assert main(["train", "--cfg", "cfgs/train/pixelcnn_cifar10.yaml", "train.early_stop.enabled", "true"]) == 2
    assert "train.early_stop watches held-out PGD accuracy" in capsys.readouterr().err


def test_cli_trains_a_pixelcnn_and_exports_it_with_its_test_bits_per_dim(tmp_path, capsys, cifar10_dir, monkeypatch):
    from dent.defenses.kinds import build_defense, parse_defense
    from dent.training import export

    monkeypatch.setattr(export, "CARD_TEST_IMAGES", 16)
    common = ["--cfg", "cfgs/train/pixelcnn_cifar10.yaml", "output.root", str(tmp_path), "output.name", "p",
              "train.n_images", "32", "train.holdout", "16", "train.batch_size", "16", "train.epochs", "2",
              "train.progress", "false", "data.dir", str(cifar10_dir)]
    assert main(["train", *common, "--until-epoch", "1", "--export", "pcnn"]) == 0
    assert "not exported: training is not finished" in capsys.readouterr().out
    assert main(["train", *common, "--resume", "--export", "pcnn", "--export-dir", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    assert "finished at epoch 2/2; held-out" in out and "bits/dim" in out and "exported" in out
    card = (tmp_path / "zoo" / "pcnn.md").read_text()
    match = re.search(r"([0-9.]+) bits per dimension on 16 test images", card)
    assert match and 5 < float(match.group(1)) < 8.1  # barely trained: close to a uniform model's 8
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert all(e["clean_acc"] is None and 0 < e["heldout_bits_per_dim"] < 9 for e in history["epochs"])
    weights = str(tmp_path / "zoo" / "pcnn.safetensors")
    defense = build_defense(tiny_net(), parse_defense({"kind": "pixeldefend", "density_model": weights}))
    assert defense(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(export.ExportError, match="not a density model"):
        export.export_density_model(_classifier_run(tmp_path), "again", directory=tmp_path / "x")


def _classifier_run(tmp_path):
    cfg = tiny_config("nominal", "train.holdout", "10", "train.batch_size", "16")
    return Trainer(cfg, carve_holdout(synthetic_split(42), cfg.train), run_dir=tmp_path / "c", build=build_tiny,
                   console=False).run().run_dir


def test_export_reference_checkpoint(tmp_path):
    from dent.models import build_model, load_weights, read_state_dict
    from dent.models.checkpoints import read_safetensors_metadata

    cfg = tiny_config("pgd", "model.arch", "resnet26_1", "train.attack.steps", "1", "train.eval.steps", "1",
                      "train.holdout", "10", "train.batch_size", "16")
    data = carve_holdout(synthetic_split(42, size=32), cfg.train)
    run_dir = tmp_path / "run"
    result = train(cfg, data=data, build=default_builder(10), run_dir=run_dir, console=False,
                   command="dent train --cfg x.yaml")
    weights, card = export_reference_checkpoint(run_dir, "tiny_pgd", directory=tmp_path / "zoo")
    state = read_state_dict(weights)
    from safetensors.torch import load_file

    raw = load_file(str(weights))
    assert all(t.dtype == torch.float16 for t in raw.values() if t.is_floating_point())
    meta = read_safetensors_metadata(weights)
    assert meta["dent.arch"] == "resnet26_1" and meta["dent.recipe"] == "pgd"
    model = load_weights(build_model("resnet26_1"), state, weights, "resnet26_1").eval()
    x = data.holdout.images[:4]
    with torch.no_grad():
        assert torch.allclose(model(x), result.model.eval()(x), atol=5e-2)
    text = card.read_text()
    first_line = next(line for line in text.splitlines() if line and not line.startswith("#"))
    assert "resnet26_1" in first_line and "pgd" in first_line and "held-out clean" in first_line
    for needle in ("dent train --cfg x.yaml", "epochs: 1 of 1", "wall time", "Hardware", "PGD-1",
                   "## License, data and limitations", "License: MIT", "Data: CIFAR-10", "Limitations:",
                   f'dent.load_model("resnet26_1", checkpoint="{weights}")'):  # outside the package: by its path
        assert needle in text, needle


def test_exports_go_to_a_user_directory_unless_the_package_is_asked_for(tmp_path, monkeypatch):
    from dent.models.reference import CHECKPOINT_DIR
    from dent.training.export import export_directory

    monkeypatch.setenv("DENT_MODEL_DIR", str(tmp_path / "models"))
    assert export_directory(None, CHECKPOINT_DIR) == (tmp_path / "models" / "exported", False)
    assert export_directory("package", CHECKPOINT_DIR) == (CHECKPOINT_DIR, True)
    assert export_directory(tmp_path / "mine", CHECKPOINT_DIR) == (tmp_path / "mine", False)
    cfg = tiny_config("nominal", "model.arch", "resnet26_1", "train.holdout", "10", "train.batch_size", "16")
    run_dir = tmp_path / "run"
    train(cfg, data=carve_holdout(synthetic_split(42, size=32), cfg.train), build=default_builder(10),
          run_dir=run_dir, console=False)
    weights, card = export_reference_checkpoint(run_dir, "mine")
    assert weights.parent == tmp_path / "models" / "exported" and card.is_file()


def test_export_refuses_unfinished_runs(tmp_path):
    cfg = tiny_config("nominal", "model.arch", "resnet26_1", "train.epochs", "2", "train.holdout", "10")
    data = carve_holdout(synthetic_split(30, size=32), cfg.train)
    train(cfg, data=data, build=default_builder(10), run_dir=tmp_path / "run", console=False, until_epoch=1)
    with pytest.raises(ExportError, match="epoch 1 of 2"):
        export_reference_checkpoint(tmp_path / "run", "x", directory=tmp_path / "zoo")
    with pytest.raises(ExportError, match="no checkpoint.pt"):
        export_reference_checkpoint(tmp_path / "nothing", "x", directory=tmp_path / "zoo")


def test_train_dry_run_prints_the_plan_and_an_estimate_and_trains_nothing(tmp_path, capsys, cifar10_dir):
    args = ["train", "--cfg", "cfgs/train/cpu_pgd_at_resnet26_1.yaml", "output.root", str(tmp_path), "output.name", "d",
            "train.n_images", "32", "train.holdout", "16", "train.batch_size", "16", "train.epochs", "2",
            "train.eval.steps", "1", "train.progress", "false", "data.dir", str(cifar10_dir)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe: pgd" in out  # the resolved config
    assert "2 steps of 16 per epoch, epochs 1..2 of 2 to run" in out and "estimate:" in out
    assert not (tmp_path / "d").exists()
    assert main([*args, "--until-epoch", "1"]) == 0
    assert main([*args, "--dry-run"]) == 0
    assert "epochs 2..2 of 2 to run (a checkpoint at epoch 1 exists: pass --resume)" in capsys.readouterr().out
