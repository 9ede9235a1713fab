"""AutoAttack on a dent-defended model, with AutoAttack's own API (pyautoattack), at a small budget.

``dent.Dent`` is an ``nn.Module`` on inputs in [0, 1], so AutoAttack takes it like any model. Two things differ
from a static model (docs/evaluation.md, "How AutoAttack treats a dynamic model"): ``batch_size`` is the batch
dent adapts on, and AutoAttack re-batches: each attack only gets the points still robust after the previous
ones, so later attacks query dent on smaller batches than the first. ``dent evaluate`` runs the same attacks
with resumable stores, intervals and the adaptive attacks built for dent; this is the bare version.

    python examples/autoattack_on_dent.py [--model autoattack_resnet18] [--n-images 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="autoattack_resnet18", help="a named model (`dent models`)")
    parser.add_argument("--n-images", type=int, default=64, help="class-stratified CIFAR-10 test images")
    parser.add_argument("--steps", type=int, default=10, help="dent's adaptation steps per batch")
    parser.add_argument("--eps", default="1.5/255", help="Linf radius, e.g. 8/255")
    parser.add_argument("--n-iter", type=int, default=None, help="APGD iterations (default: AutoAttack's 100)")
    parser.add_argument("--batch-size", type=int, default=64, help="AutoAttack's batch_size: dent's adaptation batch")
    args = parser.parse_args(argv)
    for name in ("n_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_iter is not None and args.n_iter < 1:
        parser.error(f"--n-iter must be >= 1, got {args.n_iter}")
    from dent.threat import parse_fraction

    try:
        args.eps = float(parse_fraction(args.eps))
    except ValueError:
        parser.error(f"--eps: expected a number or a fraction like 8/255, got {args.eps!r}")
    return args


@torch.no_grad()
def correct_in_batches(defended: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> int:
    """How many of ``x`` the defense classifies right, queried in AutoAttack's batches (dent adapts per batch)."""
    return sum(int((defended(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
               for i in range(0, len(x), batch_size))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pyautoattack import AutoAttack

    import dent
    from dent.errors import DentError
    from dent.attacks.autoattack import set_apgd_iterations
    from dent.evaluation.summary import wilson_interval

    try:
        model = dent.load_model(args.model)
        data = dent.load_subset("cifar10", "test", n=args.n_images)
    except DentError as exc:
        print(f"autoattack_on_dent: error: {exc}", file=sys.stderr)
        return 2
    defended = dent.Dent(model, dent.DentConfig(steps=args.steps))  # batch-wise dent, the project's defaults

    aa = AutoAttack(defended, norm="Linf", eps=args.eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
    if args.n_iter is not None:  # APGD derives its step-size schedule from n_iter: set them together
        set_apgd_iterations(aa.apgd, args.n_iter)
        set_apgd_iterations(aa.apgd_targeted, args.n_iter)
    aa.apgd_targeted.n_target_classes = 1
    clean = correct_in_batches(defended, data.images, data.labels, args.batch_size)
    x_adv, _ = aa.run_standard_evaluation(data.images, data.labels, batch_size=args.batch_size)
    robust = correct_in_batches(defended, x_adv, data.labels, args.batch_size)  # the final inputs, same batches
    n = len(data.labels)
    for label, correct in (("clean", clean), ("APGD-CE + APGD-T", robust)):
        low, high = wilson_interval(correct, n)
        print(f"{label}: {100 * correct / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
