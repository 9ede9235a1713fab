"""The ``dent`` command line: commands, config overrides, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import json
import tarfile

import pytest
import torch

from dent.cli.main import main
from dent.models import build_model


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_architectures_and_named_models(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in [
        "autoattack_resnet18", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10", "wrn28_4", "resnet26",
        "Wu2020Adversarial_extra", "Carmon2019Unlabeled", "Sehwag2020Hydra", "Wang2020Improving",
        "Hendrycks2019Using", "Wong2020Fast", "Ding2020MMA", "Rice2020Overfitting", "Rony2019Decoupling",
    ]:
        assert name in out, name
    shipped = next(line for line in out.splitlines() if line.startswith("autoattack_resnet18"))
    assert " yes " in shipped  # available offline


def test_models_layers_lists_the_names_a_detector_layer_takes_with_their_shapes(capsys):
    code, out, _ = run_cli(capsys, "models", "--layers", "resnet26_1")
    assert code == 0
    lines = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines()}
    assert lines["fc"] == ["Linear", "(10,)"] and lines["stage3"][1] == "(64, 8, 8)"
    code, _, err = run_cli(capsys, "models", "--layers", "resnet99")
    assert code == 2 and "unknown model or architecture 'resnet99'; named models: autoattack_resnet18" in err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "dent.cli.main", "models"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "autoattack_resnet18" in proc.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["accuracy", "MODEL.ARCH", "NoSuchModel"], ["unknown model", "autoattack_resnet18", "Wong2020Fast"]),
        (["accuracy", "data.n_imagez", "3"], ["unknown config key 'data.n_imagez'"]),
        (["accuracy", "data.n_images", "many"], ["'data.n_images'", "valid integer"]),
        (["evaluate", "DEFENSES.DENT.AFFINE", "everything"], ["'defenses.dent.affine'", "'batch'", "'sample'"]),
        (["accuracy", "data.n_images"], ["has no value"]),
        (["accuracy", "--cfg", "no/such/file.yaml"], ["no/such/file.yaml", "does not exist"]),
        (["accuracy", "device", "tpu"], ["'device'", "auto, cpu, cuda"]),
    ],
)
def test_bad_input_gives_message_and_nonzero_exit(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err


def test_unknown_command_lists_commands(capsys):
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2
    assert "invalid choice: 'frobnicate'" in err and "accuracy" in err and "models" in err


def test_missing_data_lists_places(capsys, tmp_path):
    code, _, err = run_cli(capsys, "accuracy", "data.dir", str(tmp_path), "output.root", str(tmp_path / "runs"))
    assert code == 2
    assert str(tmp_path) in err and "DENT_DATA" in err
    assert "Traceback" not in err


def test_corrupt_archive_is_named(capsys, tmp_path):
    bad = tmp_path / "cifar10-test.tar.gz"
    bad.write_bytes(b"\x1f\x8b this is not really gzip")
    code, _, err = run_cli(capsys, "accuracy", "data.dir", str(tmp_path), "output.root", str(tmp_path / "runs"))
    assert code == 2
    assert "cifar10-test.tar.gz" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>quota exceeded</html>", b"PK\x03\x04trunc"])
def test_corrupt_checkpoint_is_named(capsys, tmp_path, content):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "accuracy", "model.arch", "resnet18", "model.checkpoint", str(bad))
    assert code == 2
    assert "weights.pt" in err and "Traceback" not in err


def test_wrong_architecture_checkpoint_is_named(capsys, tmp_path):
    path = tmp_path / "preact.pt"
    torch.save(build_model("preact_resnet18").state_dict(), path)
    code, _, err = run_cli(capsys, "accuracy", "model.arch", "resnet18", "model.checkpoint", str(path))
    assert code == 2
    assert "preact.pt" in err and "Traceback" not in err


def test_accuracy_on_tiny_imagefolder_archive(capsys, tmp_path):
    """End to end on data the test makes: a checkpoint file and a tiny ImageFolder archive."""
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    tree = tmp_path / "tree" / "test"
    for label, name in enumerate(classes):
        (tree / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), color=(25 * label, 10 * i, 100)).save(tree / name / f"{i:04d}.png")
    with tarfile.open(tmp_path / "cifar10-test.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="test")
    ckpt = tmp_path / "r26.pt"
    torch.save(build_model("resnet26_1").state_dict(), ckpt)
    code, out, err = run_cli(
        capsys, "accuracy", "model.arch", "resnet26_1", "model.checkpoint", str(ckpt),
        "data.dir", str(tmp_path), "data.n_images=10", "output.root", str(tmp_path / "runs"), "output.name", "acc",
    )
    assert code == 0, err
    assert "on 10 stratified cifar10 test images" in out
    saved = tmp_path / "runs" / "acc"
    assert (saved / "config.yaml").is_file() and (saved / "provenance.json").is_file()
    result = json.loads((saved / "result.json").read_text())
    low, high = result["ci95_wilson"]
    assert low <= result["clean_accuracy"] <= high and high - low > 0.1  # 10 images: a wide interval
    assert f"(95% interval {low:.1%} to {high:.1%})" in out


def test_shipped_resnet18_clean_accuracy(cifar10_dir, tmp_path):
    """The shipped nominal ResNet-18 is a real pretrained model: >= 80% on 500 stratified test images."""
    from dent.data import load_subset
    from dent.evaluation.accuracy import clean_accuracy
    from dent.models import load_model

    torch.set_num_threads(2)
    data = load_subset("cifar10", "test", n=500, seed=0, data_dir=cifar10_dir)
    acc = clean_accuracy(load_model("autoattack_resnet18"), data.images, data.labels, batch_size=250, progress=False)
    torch.set_num_threads(1)
    assert acc >= 0.80, acc


def test_version_and_provenance_name_the_source_commit(capsys, tmp_path):
    import dent
    from pathlib import Path

    from dent.provenance import write_run_metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dent {dent.__version__}")
    write_run_metadata(tmp_path, {"device": "cpu"})
    source = json.loads((tmp_path / "provenance.json").read_text())["source"]
    assert source["version"] == dent.__version__
    repo = Path(dent.__file__).resolve().parents[2]
    if (repo / ".git").exists():  # a checkout (CI's clone, pip install -e): the exact commit and a dirty flag
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert source["commit"] == head.strip() and isinstance(source["dirty"], bool)
        assert f"commit {head.strip()[:12]}" in out
    else:
        assert source["commit"] is None and "commit" not in out


def test_overrides_after_a_flag_are_overrides_too_and_unknown_flags_are_refused(capsys):
    from dent.cli.main import parse

    args = parse(["evaluate", "--cfg", "cfgs/main.yaml", "data.n_images", "8", "--dry-run", "seed", "-1"])
    assert args.dry_run and args.overrides == ["data.n_images", "8", "seed", "-1"]
    with pytest.raises(SystemExit):
        parse(["evaluate", "--cfg", "cfgs/main.yaml", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
