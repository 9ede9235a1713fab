"""AutoAttack (pyautoattack 0.2.0) on one batch of a possibly dynamic defense.

How AutoAttack treats a dynamic model (see docs/evaluation.md):

* It queries the defended model at every attack step, so dent adapts on each submitted batch; the attack
  gradient flows through dent's final prediction, not through its adaptation (the paper's protocol).
* Between attacks of the ensemble it re-batches only the points that are still robust: the first attack
  sees the whole batch, later ones a smaller batch, so the batch dent adapts on changes from attack to
  attack. APGD's restarts and APGD-T's target classes do the same inside one attack. We log the sizes of
  the batches each attack submitted.
* Before attacking it runs checks; ``check_dynamic`` traces the model's forward call, sees gradient calls
  and warns "it seems to be a dynamic defense!". We log that warning with the unit. pyautoattack counts
  those calls in a module-level dict that it never resets, so once a dynamic model was checked every
  later model in the process would be reported dynamic too; we zero the counters before each run so the
  warning is about the model at hand.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dent.attacks.config import AAVersion, AttackMode, AttackPoint
from dent.attacks.wrappers import PlainGradient

AA_LOGGER = "auto-attack"
_PERTURBED = re.compile(r"^(?P<attack>[\w-]+) - (?P<i>\d+)/(?P<n>\d+) - (?P<k>\d+) out of (?P<m>\d+) successfully perturbed")
DYNAMIC_WARNING = "dynamic defense"


class _Collector(logging.Handler):
    """Collects what AutoAttack logs during one run: warnings and the size of each attacked sub-batch."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.warnings: list[str] = []
        self.attacked: dict[str, list[int]] = {}
        self.broken: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and message not in self.warnings:
            self.warnings.append(message)
        match = _PERTURBED.match(message)
        if match:
            name = match["attack"]
            self.attacked.setdefault(name, []).append(int(match["m"]))
            self.broken[name] = self.broken.get(name, 0) + int(match["k"])


@contextmanager
def _collect_log() -> Iterator[_Collector]:
    logger = logging.getLogger(AA_LOGGER)
    collector = _Collector()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.setLevel(old_level)


def _reset_dynamic_check() -> None:
    from pyautoattack import checks

    for key in checks.funcs:
        checks.funcs[key] = 0


#: pyautoattack's budget where neither the version nor the config sets one (for estimates only).
DEFAULT_BUDGET = {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}


def set_apgd_iterations(attack, n_iter: int) -> None:
    """Set APGD's iterations after construction, with the schedule constants it derives from them."""
    attack.n_iter = n_iter
    attack.n_iter_orig = n_iter
    attack.n_iter_2 = max(int(0.22 * n_iter), 1)
    attack.n_iter_min = max(int(0.06 * n_iter), 1)
    attack.size_decr = max(int(0.03 * n_iter), 1)


def build_autoattack(model: nn.Module, point: AttackPoint, attacks: list[str], *, device, seed: int):
    """A pyautoattack ``AutoAttack`` for ``point``, running ``attacks``, with the budget overrides applied."""
    from pyautoattack import AutoAttack

    if point.version in (None, AAVersion.CUSTOM):
        aa = AutoAttack(model, attacks=list(attacks), version="custom", device=device,
                        eps=point.eps, norm=point.norm.value, seed=seed)
    else:
        # Constructing with the version applies its attack settings; then run the requested subset of it.
        aa = AutoAttack(model, version=point.version.value, device=device, eps=point.eps,
                        norm=point.norm.value, seed=seed)
        aa.attacks_to_run = list(attacks)
    if point.n_iter is not None:
        set_apgd_iterations(aa.apgd, point.n_iter)
        set_apgd_iterations(aa.apgd_targeted, point.n_iter)
        aa.fab.n_iter = point.n_iter
    if point.n_restarts is not None:
        aa.apgd.n_restarts = point.n_restarts
        aa.fab.n_restarts = point.n_restarts
    if point.n_target_classes is not None:
        aa.apgd_targeted.n_target_classes = point.n_target_classes
        aa.fab.n_target_classes = point.n_target_classes
    if point.n_queries is not None:
        aa.square.n_queries = point.n_queries
    if point.eot_iter is not None:
        aa.apgd.eot_iter = point.eot_iter
        aa.apgd_targeted.eot_iter = point.eot_iter
    return aa


def _one_run(model, x, y, point, attacks, *, device, seed):
    aa = build_autoattack(model, point, attacks, device=device, seed=seed)
    _reset_dynamic_check()
    with _collect_log() as log:
        x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=len(x))
    y_adv = y_adv.detach().cpu()
    return y_adv.eq(y.cpu()), y_adv, x_adv.detach().cpu(), log


def autoattack_runs(point: AttackPoint) -> list[tuple[str, list[str]]]:
    """(label, attack list) of each AutoAttack run ``point.mode`` asks for: every attack alone (individual),
    all of them cumulatively as ``ensemble``, or both."""
    attacks = list(point.attacks)
    runs: list[tuple[str, list[str]]] = []
    if point.mode in (AttackMode.INDIVIDUAL, AttackMode.BOTH):
        runs += [(name, [name]) for name in attacks]
    if point.mode in (AttackMode.ENSEMBLE, AttackMode.BOTH):
        runs.append(("ensemble", attacks))
    return runs


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, point: AttackPoint, *,
                   device, seed: int, progress: bool = False):
    """The ``autoattack`` attack runner (see :mod:`dent.attacks.registry`).

    ``mode`` ensemble runs the attacks cumulatively (label ``ensemble``), individual runs each attack on
    the whole batch (labels = attack names), both does both. Each run uses a fresh ``AutoAttack`` object,
    since pyautoattack mutates attack settings while running (FAB-T sets FAB's restarts to 1).
    """
    from dent.attacks.registry import AttackOutcome

    model = PlainGradient(model)  # a defense computed outside autograd: zero gradient, not an error
    runs = autoattack_runs(point)

    robust, pred, inputs, attacked, warnings = {}, {}, {}, {}, []
    for label, attack_list in runs:
        flags, y_adv, inputs[label], log = _one_run(model, x, y, point, attack_list, device=device, seed=seed)
        robust[label], pred[label] = flags, y_adv
        attacked[label] = log.attacked
        warnings += [w for w in log.warnings if w not in warnings]
    notes = {
        "dynamic_warning": any(DYNAMIC_WARNING in w for w in warnings),
        "warnings": warnings,
        "attacked_batch_sizes": attacked,  # label -> attack -> sizes of the sub-batches it submitted
    }
    return AttackOutcome(robust=robust, pred=pred, notes=notes, x_adv=inputs)
