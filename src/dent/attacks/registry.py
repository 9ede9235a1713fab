"""The attack registry: ``attack.name`` -> a runner that attacks one batch at one attack point.

A runner is ``runner(model, x, y, point, *, device, seed, progress) -> AttackOutcome``. ``model`` is the
(possibly dynamic) defended model, called on whole batches; ``x``, ``y`` is one batch on ``device``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from dent.registry import Registry


@dataclass
class AttackOutcome:
    """Per-point results of attacking one batch.

    ``robust[label]`` is a bool tensor [B]: the point withstood that attack (or the ensemble); ``pred[label]``
    the defended model's prediction of the attack's final example. Labels are AutoAttack attack names
    (``apgd-ce``, ...) for individually-run attacks, ``ensemble`` for AutoAttack's cumulative run and
    ``pgd`` for PGD. A point is robust in the worst case only if it is robust under every label.
    """

    robust: dict[str, torch.Tensor]
    pred: dict[str, torch.Tensor]
    notes: dict[str, Any] = field(default_factory=dict)
    #: per label, the adversarial input [B, C, H, W] of each point whose answer ``pred[label]`` is (torchattacks'
    #: ``attack(model, x, y) -> x_adv``; AutoAttack's are its final inputs, answered in its re-batched sub-batches)
    x_adv: dict[str, torch.Tensor] = field(default_factory=dict)

    def worst_case_inputs(self) -> torch.Tensor:
        """Per point, the input of the first label (in order) under which it was not robust, else of the last:
        the input that realizes its per-point worst case."""
        labels = list(self.x_adv)
        if not labels:
            raise ValueError("this attack returned no adversarial inputs")
        chosen = self.x_adv[labels[-1]].clone()
        decided = torch.zeros(len(chosen), dtype=torch.bool)
        for label in labels:
            broken = ~self.robust[label].cpu() & ~decided
            chosen[broken] = self.x_adv[label][broken]
            decided |= broken
        return chosen


class AttackRunner(Protocol):
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, point: Any, *,
        device: torch.device, seed: int, progress: bool,
    ) -> AttackOutcome: ...


ATTACKS: Registry[Callable[..., AttackOutcome]] = Registry("attack")


def _register_builtin() -> None:
    # Imported here so that importing the registry (e.g. from the config validator) stays cheap.
    from dent.attacks.autoattack import run_autoattack
    from dent.attacks.pgd import run_pgd

    ATTACKS.register("autoattack", run_autoattack)
    ATTACKS.register("pgd", run_pgd)

    from dent.attacks.adaptive import ADAPTIVE_RUNNERS  # transfer, mixed, through_adaptation, bpda_eot, ...

    for name, runner in ADAPTIVE_RUNNERS.items():
        ATTACKS.register(name, runner)

    from dent.attacks.batch_mates import run_batch_mates  # malicious inputs beside benign ones in a batch

    ATTACKS.register("batch_mates", run_batch_mates)

    from dent.attacks.wrappers import run_declared_apgd  # any defense, by its declared traits

    ATTACKS.register("declared_apgd", run_declared_apgd)

    from dent.attacks.cw import run_cw_l2  # Carlini & Wagner's minimal-L2 attack

    ATTACKS.register("cw_l2", run_cw_l2)


_register_builtin()
