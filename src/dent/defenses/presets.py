"""Named defense settings: ``DentConfig(preset=NAME)`` or ``{preset: NAME}`` in a config file.

A preset is a mapping of :class:`~dent.defenses.config.DentConfig` keys to values. When a config names one,
the preset's values replace the class defaults and keys given next to it override them
(``{preset: dent_plus_official, steps: 3}``). Configs name presets instead of copying their keys, so the
settings of a published algorithm are written down once (a copied setting drifts).

Values are plain data (no DentConfig), so that this module does not import the config it serves.
"""

from __future__ import annotations

from typing import Any

from dent.registry import Registry

Preset = dict[str, Any]

PRESETS: Registry[Preset] = Registry("preset")

#: The paper's batch-wise dent (Table 1): one scale/shift per channel, Adam 1e-3, entropy, training
#: statistics. These are DentConfig's own defaults, named so that configs can say what they use.
PRESETS.register("dent", {
    "affine": "batch", "stats": "fixed", "objective": "entropy", "optimizer": "adam", "lr": 1e-3,
    "betas": (0.9, 0.999), "weight_decay": 0.0, "steps": 10,
})

#: The official dent+ (DequanWang/dent, cfgs/dent.yaml with dent.py), exactly: per-input BatchNorm
#: scales/shifts on the training statistics, folded into one scale and shift per input as that code computes
#: them, the SHOT loss with its +1e-5, the ``adamod`` package's rule, 6 steps, and the gradient of the
#: batch-mean loss (so a step depends on the batch size B, through AdaMod's eps).
PRESETS.register("dent_plus_official", {
    "affine": "sample", "stats": "fixed", "objective": "shot", "diversity_weight": 1.0,
    "optimizer": "adamod_official", "lr": 6e-3, "betas": (0.99, 0.999), "beta3": 0.6, "weight_decay": 0.0,
    "steps": 6, "sample_grad": "batch_mean", "bn_arithmetic": "folded",
})

#: The project's batch-size-independent dent+, a deliberate deviation from the official one: each
#: per-input tensor steps on B times the batch objective's gradient (for a per-input objective, exactly its
#: own input's term), so an input's adaptation does not shrink with the batch size; the exact-log
#: info-max objective; AdaMod's published rule; the fused BatchNorm kernel. Same hyper-parameters as the
#: official setting. These are the settings of the committed result stores (results/security*,
#: results/pgd_nominal, results/reference), whose unit keys they keep.
PRESETS.register("dent_plus_bsi", {
    "affine": "sample", "stats": "fixed", "objective": "infomax", "diversity_weight": 1.0,
    "optimizer": "adamod", "lr": 6e-3, "betas": (0.99, 0.999), "beta3": 0.6, "weight_decay": 0.0,
    "steps": 6, "sample_grad": "own_term", "bn_arithmetic": "fused",
})
