"""Calibrate the feature-squeezing detector (Xu et al. 2018) of a named model and print its config entry.

The threshold is set at a false-positive rate on clean images of the *training* split (class-stratified), so
the test images an evaluation attacks are not used to set it:

    python examples/calibrate_detector.py --model autoattack_resnet18 --n-images 1000 --fpr 0.05
"""

from __future__ import annotations

import argparse

import torch

from dent.data import load_subset
from dent.defenses.detection import FeatureSqueezing
from dent.errors import DentError
from dent.models import load_model


def calibrated_threshold(model_name: str, n_images: int, fpr: float, bits: int, median_size: int) -> float:
    model = load_model(model_name, download=False)
    images = load_subset("cifar10", "train", n=n_images, seed=0).images
    with torch.no_grad():
        return FeatureSqueezing.standard(model, bits=bits, median_size=median_size).calibrate(images, fpr=fpr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="autoattack_resnet18")
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--median-size", type=int, default=2)
    args = parser.parse_args()
    if args.n_images < 1:
        parser.error(f"--n-images must be >= 1, got {args.n_images}")
    if not 1 <= args.bits <= 8 or not 1 <= args.median_size <= 15:
        parser.error(f"--bits must be in 1..8 and --median-size in 1..15, got {args.bits} and {args.median_size}")
    if not 0 <= args.fpr < 1:
        parser.error(f"--fpr must be in [0, 1), got {args.fpr}")
    try:
        threshold = calibrated_threshold(args.model, args.n_images, args.fpr, args.bits, args.median_size)
    except DentError as exc:
        parser.exit(2, f"calibrate_detector.py: error: {exc}\n")
    print(f"threshold {threshold!r} at FPR {args.fpr} on {args.n_images} training images of {args.model}")
    print(f"  squeezed: {{kind: feature_squeezing, bits: {args.bits}, median_size: {args.median_size}, "
          f"fpr: {args.fpr}, threshold: {threshold!r}}}")


if __name__ == "__main__":
    main()
