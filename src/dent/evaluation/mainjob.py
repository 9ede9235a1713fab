"""The main job: what ``dent evaluate`` runs without ``--cfg`` (mirrored, with comments, in cfgs/main.yaml).

The shipped nominal ResNet-18 (pyautoattack's example checkpoint) on class-stratified CIFAR-10 test
images, static vs dent vs dent with Sigma (input adaptation), under a reduced AutoAttack at Linf 1.5/255
(the nominal-model threat of the paper's Table 4). The budget is reduced so that it finishes in under
5 minutes on 2 CPU cores; cfgs/main.yaml documents the full-budget command for a GPU.
"""

from __future__ import annotations

from typing import Any

MAIN_JOB: dict[str, Any] = {
    "model": {"arch": "autoattack_resnet18"},
    "data": {"dataset": "cifar10", "split": "test", "n_images": 64, "seed": 0, "batch_size": 64},
    "defenses": {
        "static": {"steps": 0},
        "dent": {"steps": 2},
        "dent_sigma": {"steps": 2, "input": "batch"},
    },
    "attack": {
        "name": "autoattack",
        "version": "custom",
        "attacks": ["apgd-ce", "apgd-t"],
        "threats": ["Linf:1.5/255"],
        "n_iter": [5],
        "n_restarts": 1,
        "n_target_classes": 1,
    },
    "seed": 0,
}


def main_job() -> dict[str, Any]:
    """A fresh copy of :data:`MAIN_JOB` (a config-file-like dict for :meth:`dent.evaluation.config.EvaluateConfig.load`)."""
    import copy

    return copy.deepcopy(MAIN_JOB)
