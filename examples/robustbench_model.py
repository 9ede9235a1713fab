"""A RobustBench model under dent: load it by its RobustBench name, wrap it, evaluate it with `dent.benchmark_defenses`.

dent's zoo loads RobustBench's CIFAR-10 checkpoints by name with RobustBench's spelling (``load_model(name,
dataset=, threat_model=)``) from ``MODEL_DIR/cifar10/<threat>/<name>.pt`` (RobustBench's layout; `dent models`
lists them and whether each is on this machine). Without the checkpoint, ``--checkpoint random`` builds the
model's architecture with random weights, saved to a temporary file, so that the whole path runs offline (the
accuracies are then meaningless, the mechanics are not).

    python examples/robustbench_model.py --model Wong2020Fast [--checkpoint PATH|random] [--n-images 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


#: The paper's radius of each threat model.
THREATS = {"Linf": "Linf:8/255", "L2": "L2:0.5"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Wong2020Fast", help="a RobustBench model of `dent models`")
    parser.add_argument("--threat-model", default="Linf", choices=sorted(THREATS), help="RobustBench's threat_model")
    parser.add_argument("--checkpoint", default=None,
                        help="the checkpoint file (default: MODEL_DIR's); 'random': random weights, offline")
    parser.add_argument("--n-images", type=int, default=16, help="class-stratified CIFAR-10 test images")
    parser.add_argument("--steps", type=int, default=2, help="dent's adaptation steps")
    parser.add_argument("--out", default=None, help="the run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    for name in ("n_images", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def random_checkpoint(name: str, threat_model: str, directory: Path) -> Path:
    """The architecture of RobustBench model ``name`` with random weights, saved as a state dict."""
    from dent.models import PRETRAINED

    variant = PRETRAINED.get(name).variant(threat_model)
    torch.manual_seed(0)
    path = directory / f"{name}-random.pt"
    torch.save(variant.factory().state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dent
    from dent.errors import DentError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            checkpoint = args.checkpoint
            if checkpoint == "random":
                checkpoint = str(random_checkpoint(args.model, args.threat_model, Path(tmp)))
            model = dent.load_model(args.model, dataset="cifar10", threat_model=args.threat_model,
                                    checkpoint=checkpoint, download=False)
            results = dent.benchmark_defenses(
                model, defenses={"static": {"steps": 0}, "dent": {"steps": args.steps}},
                attack={"version": "custom", "attacks": ["apgd-ce"], "threats": [THREATS[args.threat_model]],
                        "n_iter": [5], "n_restarts": 1},
                n_images=args.n_images, batch_size=args.n_images, evaluation={"progress": False}, name=args.model,
                run_dir=Path(args.out) if args.out else Path(tmp) / "run")
        except DentError as exc:
            print(f"robustbench_model: error: {exc}", file=sys.stderr)
            return 2
        print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
