"""A training recipe end to end at a tiny size: train, export with a model card, evaluate with dent on top.

The same steps as ``dent train --cfg cfgs/train/cpu_pgd_at_resnet26_1.yaml --export NAME`` and ``dent evaluate``,
through the Python API, on a few hundred images for one epoch (seconds on a CPU; the model learns little).
Every recipe of ``dent.training.recipes.RECIPES`` runs the same way (``--recipe``).

    python examples/train_tiny_recipe.py [--recipe pgd] [--n-images 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pgd", help="a training recipe (docs/training.md)")
    parser.add_argument("--n-images", type=int, default=256, help="training images (class-stratified)")
    parser.add_argument("--out", default=None, help="where the run, the export and the evaluation go")
    args = parser.parse_args(argv)
    if args.n_images < 20:
        parser.error(f"--n-images must be >= 20 (two batches of 10 and a held-out set), got {args.n_images}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dent
    from dent.errors import DentError
    from dent.training.config import TrainConfig
    from dent.training.export import export_reference_checkpoint
    from dent.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        try:
            cfg = TrainConfig.load("cfgs/train/cpu_pgd_at_resnet26_1.yaml" if Path("cfgs").is_dir() else None, [
                "model.arch", "resnet26_1", "train.recipe", args.recipe, "train.epochs", "1",
                "train.n_images", str(args.n_images), "train.holdout", "32", "train.batch_size", "32",
                "train.eval.steps", "2", "train.progress", "false", "output.root", str(out), "output.name", "train",
            ])
            result = train(cfg, console=False)
            weights, card = export_reference_checkpoint(result.run_dir, "tiny_example", directory=out / "zoo")
            model = dent.load_model("resnet26_1", checkpoint=weights)  # an architecture and its weights file
            results = dent.benchmark_defenses(
                model, defenses={"static": {"steps": 0}, "dent": {"steps": 2}},
                attack={"version": "custom", "attacks": ["apgd-ce"], "threats": ["Linf:8/255"], "n_iter": [3],
                        "n_restarts": 1},
                n_images=16, batch_size=16, evaluation={"progress": False}, run_dir=out / "evaluate", name="resnet26_1")
        except DentError as exc:
            print(f"train_tiny_recipe: error: {exc}", file=sys.stderr)
            return 2
        last = result.history[-1]
        print(f"trained {args.recipe}: {result.status} at epoch {result.epoch}, held-out clean "
              f"{100 * last['clean_acc']:.1f}%; exported {weights.name} with its card {card.name}")
        print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
