"""Your own nn.Module defense through dent's security harness, at a tiny budget (CPU, seconds).

The defense declares its traits as class attributes (dent.defenses.protocol): here it rounds the input
to 3 bits (not differentiable, so attacks use BPDA with the identity surrogate) and adds Gaussian noise
(randomized, so attacks average gradients over draws: EOT). An evaluate config names it by import path,
``kind: own_defense:NoisyQuantizer``, with its constructor arguments under ``params``; here it runs on a
small random BatchNorm network and random images labelled by that network, next to the undefended model
and a JPEG-then-dent pipeline.

    python examples/own_defense.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that `own_defense:...` imports this file


class NoisyQuantizer(nn.Module):
    """``model(round_to_bits(x + noise))``."""

    differentiable = False  # rounding: zero gradient almost everywhere
    randomized = True  # fresh noise on every call
    adaptive = False
    cost = 1.0

    def __init__(self, model: nn.Module, bits: int = 3, std: float = 0.02):
        super().__init__()
        self.model, self.levels, self.std = model, 2 ** bits - 1, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = (x + self.std * torch.randn_like(x)).clamp(0, 1)
        return self.model((noisy * self.levels).round() / self.levels)

    def bpda_surrogate(self) -> nn.Module:
        """The differentiable approximation attacks take the gradient of: the noise without the rounding."""
        return _NoisyOnly(self.model, self.std)


class _NoisyOnly(nn.Module):
    randomized = True

    def __init__(self, model: nn.Module, std: float):
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x + self.std * torch.randn_like(x)).clamp(0, 1))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10)).eval()


def main(argv: list[str] | None = None) -> Path:
    from dent import Split
    from dent.evaluation.report import write_report
    from dent.evaluation.runner import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="own-defense-"))

    model = tiny_model()
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    config = {
        "device": "cpu",
        "data": {"n_images": 16, "batch_size": 8},
        "evaluation": {"progress": False, "report": False},
        "defenses": {
            "undefended": {"steps": 0},
            "own": {"kind": "own_defense:NoisyQuantizer", "params": {"bits": 3, "std": 0.02}},
            "jpeg_dent": {"kind": "pipeline", "stages": ["jpeg", {"steps": 1, "lr": 0.01}]},
        },
        # APGD-CE and APGD-T with the gradient each defense's declarations call for (BPDA, EOT)
        "attack": {"name": "declared_apgd", "threats": ["Linf:8/255"], "n_iter": [3], "n_target_classes": 1,
                   "eot_iter": 2},
    }
    data = Split(images, labels, classes=tuple(str(c) for c in range(10)), name="random-images")
    run = evaluate(config, model=model, data=data, run_dir=out)
    print(write_report([run.run_dir], run.run_dir).text)
    return run.run_dir


if __name__ == "__main__":
    main()
