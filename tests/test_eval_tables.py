"""Slow tier: every experiment config in cfgs/ runs end to end at a tiny budget (a small random ResNet-26-1,
8 fake CIFAR-10 images, 1-2 attack iterations), and its report has the table's sections and figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from dent.cli.main import main
from eval_support import write_fake_cifar10, write_small_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "cfgs").glob("table*.yaml")) + ["figure4.yaml", "main.yaml",
                                                                       "security_transforms.yaml", "security_randomized.yaml",
                                                                       "security_composed.yaml", "security_eot_sweep.yaml"]

#: What each config's report must show beyond the main table.
EXPECTED = {
    "table2.yaml": ["## Per attack", "apgd-ce", "square", "ensemble"],
    "table4.yaml": ["Linf 1.5/255", "L2 0.2"],
    "table7.yaml": ["## Accuracy vs dent steps", "accuracy_vs_steps.png"],
    "table13.yaml": ["## Accuracy vs dent steps", "accuracy_vs_steps.png"],
    "table9.yaml": ["## Accuracy vs batch size", "accuracy_vs_batch_size.png"],
    "table10.yaml": ["## Accuracy vs attack iterations", "accuracy_vs_iterations.png"],
    "figure4.yaml": ["## Accuracy vs epsilon", "accuracy_vs_eps.png"],
    "security_transforms.yaml": ["gradient masking", "jpeg", "median"],  # JPEG's plain gradient is flagged
    "security_randomized.yaml": ["gradient masking", "resize_pad", "sap"],  # TVM's solver masks it
    "security_composed.yaml": ["jpeg_dent", "resize_pad_dent", "clean, mean (min-max) over draws"],
    "security_eot_sweep.yaml": ["DECLARED_APGD", "clean, mean (min-max) over draws"],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    return {"data": write_fake_cifar10(root / "data"), "ckpt": write_small_checkpoint(root / "m.pt"), "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_end_to_end_at_a_tiny_budget(name, small, capsys):
    tiny = [
        "model.arch", "resnet26_1", "model.checkpoint", small["ckpt"], "data.dir", small["data"],
        "data.n_images", "8", "data.batch_size", "8", "device", "cpu", "evaluation.progress", "false",
        "output.root", small["root"] / "runs", "output.name", name,
        "attack.n_iter", "[1, 2]" if name == "table10.yaml" else "1",
        "attack.n_restarts", "1", "attack.n_target_classes", "1", "attack.n_queries", "5",
    ]
    if name == "table9.yaml":
        tiny += ["evaluation.batch_sizes", "[1, 2, 8]"]
    if name == "figure4.yaml":
        tiny += ["attack.threats", "[Linf:1/255, Linf:4/255, L2:0.2]"]
    code = main(["evaluate", "--cfg", str(REPO / "cfgs" / name), *map(str, tiny)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| Accuracy (%) | Natural" in out
    report = small["root"] / "runs" / name / "report"
    text = (report / "report.md").read_text()
    files = {p.name for p in report.iterdir()}
    assert {"report.md", "results.csv", "results.json", "accuracy.png", "accuracy_vs_eps.png"} <= files
    for expected in EXPECTED.get(name, []):
        assert expected in text or expected in files, expected
