"""``dent accuracy``: clean accuracy of a model on N class-stratified test images."""

from __future__ import annotations

import argparse
import json

from dent.cli.command import command, config_from_args, prepare_run_dir
from dent.data import load_subset
from dent.evaluation.accuracy import clean_accuracy
from dent.evaluation.summary import wilson_interval
from dent.models import load_model
from dent.runtime import resolve_device
from dent.sections import ModelDataConfig


@command("accuracy", "clean accuracy of a named model on N class-stratified test images", config=ModelDataConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    device = resolve_device(cfg.device)
    model = load_model(
        cfg.model.arch,
        threat_model=cfg.model.threat_model,
        model_dir=cfg.model.model_dir,
        checkpoint=cfg.model.checkpoint,
    )
    data = load_subset(
        cfg.data.dataset, cfg.data.split, n=cfg.data.n_images, seed=cfg.data.seed,
        data_dir=cfg.data.dir, download=cfg.data.download,
    )
    run_dir = prepare_run_dir(cfg, "accuracy")
    acc = clean_accuracy(model, data.images, data.labels, batch_size=cfg.data.batch_size, device=device)
    n = len(data.labels)
    low, high = wilson_interval(round(acc * n), n)
    result = {
        "model": cfg.model.arch,
        "dataset": cfg.data.dataset,
        "split": cfg.data.split,
        "n_images": len(data.labels),
        "subset_seed": cfg.data.seed,
        "clean_accuracy": acc,
        "ci95_wilson": [low, high],
        "device": str(device),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"clean accuracy of {cfg.model.arch} on {len(data.labels)} stratified {cfg.data.dataset} "
        f"{cfg.data.split} images (seed {cfg.data.seed}): {acc:.2%} (95% interval {low:.1%} to {high:.1%})"
    )
    print(f"results: {run_dir}")
    return 0
