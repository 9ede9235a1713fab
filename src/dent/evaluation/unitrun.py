"""Compute one unit of an evaluation: its clean predictions, or the attack's per-point flags and predictions (and,
when asked, the adversarial inputs), as the JSON-ready result the store keeps. Executors
(:mod:`dent.evaluation.executors`) call it wherever the unit runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from dent.attacks.masking import logits_and_plain_gradient
from dent.attacks.registry import ATTACKS
from dent.defenses.detection import detection_notes, rejects
from dent.defenses.protocol import traits_of
from dent.evaluation.accuracy import predict
from dent.evaluation.units import CLEAN, Unit


class QueryProgress(nn.Module):
    """Passes calls through to ``model`` and counts them on a progress bar (AutoAttack has none)."""

    def __init__(self, model: nn.Module, total: Optional[int]):
        super().__init__()
        self.model = model
        self.total = total
        self.bar = None

    def __enter__(self) -> "QueryProgress":
        self.bar = tqdm(total=self.total, desc="  queries", unit="query", leave=False, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())  # a log file gets one line per unit (UnitProgress)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.bar.update(1)
        return out


def apgd_queries(point) -> tuple[int, tuple[str, ...]]:
    """At most how many model calls AutoAttack's APGD attacks make on one batch, and the other attacks of the
    point (FAB-T, Square), whose calls depend on the points APGD leaves robust (Square: up to its query budget
    of forward calls on each)."""
    from dent.attacks.autoattack import DEFAULT_BUDGET

    n_iter = point.n_iter or DEFAULT_BUDGET["n_iter"]
    per_run = 8  # pyautoattack's checks (7 calls) and the initial clean prediction
    per_attack = {
        "apgd-ce": (point.n_restarts or DEFAULT_BUDGET["n_restarts"]) * (n_iter + 1) + 2,
        "apgd-dlr": (point.n_restarts or DEFAULT_BUDGET["n_restarts"]) * (n_iter + 1) + 2,
        "apgd-t": (point.n_target_classes or DEFAULT_BUDGET["n_target_classes"]) * (n_iter + 2) + 2,
    }
    runs = []
    if point.mode.value in ("individual", "both"):
        runs += [[a] for a in point.attacks]
    if point.mode.value in ("ensemble", "both"):
        runs.append(list(point.attacks))
    others = tuple(dict.fromkeys(a for a in point.attacks if a not in per_attack))
    return sum(per_run + sum(per_attack.get(a, 0) for a in run) for run in runs), others


def expected_queries(point) -> Optional[int]:
    """At most how many model calls AutoAttack makes on one batch, where that is known in advance (APGD only)."""
    queries, others = apgd_queries(point)
    return None if others else queries


def run_unit(unit: Unit, defended: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             device: torch.device, seed: int, progress: bool = False, clean_draws: int = 1,
             adversarial_dir: Optional[Path] = None) -> dict[str, Any]:
    """Compute one unit's per-point results (JSON-ready); a randomized defense's clean prediction is drawn
    ``clean_draws`` times (``notes.clean_draws``, the first being ``clean_pred``). With ``adversarial_dir``, an
    attack's adversarial inputs (where it returns them) are saved there as ``<unit key>.safetensors``."""
    index = torch.tensor(unit.positions, dtype=torch.long)
    x = images[index].to(device)
    y = labels[index].to(device)
    torch.manual_seed(seed)
    result: dict[str, Any] = {"positions": list(unit.positions), "labels": y.cpu().tolist()}
    if unit.kind == CLEAN:
        logits, gradient = logits_and_plain_gradient(defended, x, y)
        result["clean_pred"] = logits.argmax(dim=1).cpu().tolist()
        result["notes"] = {"plain_gradient": gradient}
        if rejects(defended):
            result["notes"]["detection"] = detection_notes(logits)
        if clean_draws > 1 and traits_of(defended).randomized:
            result["notes"]["clean_draws"] = [result["clean_pred"]] + [
                predict(defended, x, len(x), x.device, progress=False).tolist() for _ in range(clean_draws - 1)]
        return result
    runner = ATTACKS.get(unit.point.name)
    if progress and unit.point.name == "autoattack":
        with QueryProgress(defended, expected_queries(unit.point)) as counted:
            outcome = runner(counted, x, y, unit.point, device=device, seed=seed, progress=progress)
    else:
        outcome = runner(defended, x, y, unit.point, device=device, seed=seed, progress=progress)
    if adversarial_dir is not None and outcome.x_adv:
        save_adversarial(adversarial_dir / f"{unit.key}.safetensors", unit, outcome, y)
    result["robust"] = {label: flags.cpu().bool().tolist() for label, flags in outcome.robust.items()}
    result["pred"] = {label: pred.cpu().tolist() for label, pred in outcome.pred.items()}
    result["notes"] = outcome.notes
    return result


#: Where ``evaluation.save_adversarial`` keeps the adversarial inputs, in the run directory.
ADVERSARIAL_DIR = "adversarial"


def save_adversarial(path: Path, unit: Unit, outcome: Any, labels: torch.Tensor) -> None:
    """One unit's adversarial inputs: each label's (``x_adv/<label>``), each point's worst case (``worst``), the
    labels and positions in the evaluation subset; metadata: the unit's description and key."""
    from dent.models.checkpoints import save_safetensors

    tensors = {f"x_adv/{label}": x for label, x in outcome.x_adv.items()}
    tensors.update(worst=outcome.worst_case_inputs(), labels=labels.cpu(),
                   positions=torch.tensor(unit.positions, dtype=torch.long))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, {"dent.unit": unit.describe(), "dent.unit_key": unit.key}, dtype=None)
