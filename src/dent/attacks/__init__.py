"""Attacks on (possibly dynamic) defenses: AutoAttack through pyautoattack, PGD with restarts (cross-entropy
or logit-margin loss), Carlini & Wagner's L2 attack (dent.attacks.cw), and adaptive attacks on dent
(dent.attacks.adaptive: transfer, mixed, through_adaptation, bpda_eot, surrogate_transfer; dent.attacks.batch_mates)."""

from dent.attacks.adaptive_config import ADAPTIVE_ATTACKS, AdaptiveSection
from dent.attacks.config import (
    AUTOATTACK_ATTACKS, AAVersion, AttackMode, AttackPoint, AttackSection, CWSection, PGDLoss, Threat,
)
from dent.attacks.cw import CWResult, cw_l2
from dent.attacks.pgd import PGDResult, pgd
from dent.attacks.registry import ATTACKS, AttackOutcome

__all__ = [
    "ADAPTIVE_ATTACKS", "AdaptiveSection", "ATTACKS", "AUTOATTACK_ATTACKS", "AAVersion", "AttackMode", "AttackOutcome", "AttackPoint",
    "AttackSection", "CWResult", "CWSection", "PGDLoss", "PGDResult", "Threat", "cw_l2", "pgd",
]
