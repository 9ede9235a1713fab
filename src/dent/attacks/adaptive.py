"""Adaptive attacks on dent: denied updates (transfer), mixed batches, attacks through the adaptation,
BPDA+EOT on a shortened defense, and transfer from stronger surrogates.

Each is an attack runner of :mod:`dent.attacks.registry` (``runner(model, x, y, point, *, device, seed,
progress) -> AttackOutcome``), selected by ``attack.name`` with its knobs in ``attack.adaptive`` (see
:mod:`dent.attacks.adaptive_config`); ``model`` is the defense under evaluation (a
:class:`~dent.defenses.Dent`, or input transforms before one, whose variants are then attacked behind the
same transforms, straight-through where they are not differentiable; ``mixed`` takes any model). Results are per point and per label; a point's
robust accuracy in the report is the worst case over every label and every attack run on the defense.

Every reported prediction is the defense's own answer for a batch that was actually submitted to it
(whole evaluation batches, or the mixed batches), never a surrogate's.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dent.attacks.adaptive_config import (
    ADAPTIVE_ATTACKS, DEFAULT_N_ITER, DEFAULT_N_RESTARTS, DEFAULT_N_TARGET_CLASSES, AdaptiveSection, Source, adv_count,
    mix_label,
)
from dent.attacks.apgd_batch import apgd_batch
from dent.attacks.wrappers import BPDA, eot_draws, gradient_view
from dent.defenses.blur import FixedBlur
from dent.defenses.config import InputMode
from dent.defenses.dent import Dent
from dent.defenses.protocol import behind_transforms, bpda_surrogate, inherit_traits
from dent.defenses.differentiable import DifferentiableDent, shortened
from dent.errors import InvalidInputError

#: Puts a variant of the defense's Dent behind the defense's input transforms (identity for a bare Dent).
Rewrap = Callable[[nn.Module], nn.Module]

#: bpda_eot's EOT samples when ``attack.eot_iter`` is not set and ``adaptive.eot_noise`` > 0 (else the defense's own).
DEFAULT_EOT_ITER = 4


def _dent_of(model: nn.Module, attack: str) -> tuple[Dent, Rewrap]:
    """The Dent of the defense (behind its input transforms, if any: a pipeline ending in dent) and the
    function that puts a variant of it behind the same transforms (``behind_transforms``)."""
    core, rewrap = behind_transforms(model)
    if isinstance(core, DifferentiableDent):
        return core.dent, rewrap
    if not isinstance(core, Dent):
        raise InvalidInputError(
            f"attack {attack!r} needs the defense to be a dent.defenses.Dent, or input transforms before one (it "
            f"uses its wrapped model and adaptation), got {type(core).__name__}; attack.name declared_apgd "
            "attacks any defense"
        )
    return core, rewrap


def _adaptive(point: Any) -> AdaptiveSection:
    return point.adaptive if point.adaptive is not None else AdaptiveSection()


def _budget(point: Any, name: str, defense: nn.Module) -> dict[str, int]:
    """APGD's budget; its EOT draws per gradient are ``attack.eot_iter``, else bpda_eot's noisy copies, else
    what ``defense`` declares (:func:`~dent.attacks.wrappers.eot_draws`: several if it is randomized, e.g. a
    random transform before dent)."""
    noisy = name == "bpda_eot" and _adaptive(point).eot_noise > 0
    eot = point.eot_iter or (DEFAULT_EOT_ITER if noisy else eot_draws(defense, None))
    return {
        "n_iter": point.n_iter or DEFAULT_N_ITER,
        "n_restarts": point.n_restarts or DEFAULT_N_RESTARTS.get(name, 1),
        "n_target_classes": point.n_target_classes or DEFAULT_N_TARGET_CLASSES,
        "eot_iter": eot,
    }


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


class StaticModel(nn.Module):
    """The wrapped model without adaptation, in eval mode for the call (its mode is restored).

    ``autocast``: the forward (and so the attack's backward) under this autocast dtype, logits in float32.
    """

    def __init__(self, model: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def forward(self, x: Tensor) -> Tensor:
        training = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            if self.autocast is None:
                return self.model(x)
            with torch.autocast(x.device.type, self.autocast):
                return self.model(x).float()
        finally:
            for m, mode in training:
                m.training = mode


def _shortened_steps(dent: Dent, adaptive: AdaptiveSection) -> int:
    return max(1, min(adaptive.short_steps, dent.config.steps))


def _source(dent: Dent, source: Source, adaptive: AdaptiveSection, rewrap: Rewrap,
            x: Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """The model a transfer attack on the batch ``x`` optimizes against (behind the defense's input
    transforms), and how it was built."""
    if source in (Source.BLUR, Source.ADAPTED_BLUR):
        return _blur_source(dent, source, adaptive, rewrap, x)
    if source is Source.STATIC or dent.config.steps == 0:
        return _static_source(dent, adaptive, rewrap)
    short = DifferentiableDent(shortened(dent, _shortened_steps(dent, adaptive)), checkpoint=adaptive.checkpoint)
    return rewrap(short), {"source": "shortened", "gradient": short.describe()}


def _static_autocast(adaptive: AdaptiveSection) -> torch.dtype | None:
    return None if adaptive.static_autocast == "none" else torch.bfloat16


def _static_source(dent: Dent, adaptive: AdaptiveSection, rewrap: Rewrap) -> tuple[nn.Module, dict[str, Any]]:
    info = {"source": "static"}
    if adaptive.static_autocast != "none":
        info["autocast"] = adaptive.static_autocast
    return rewrap(StaticModel(dent.model, _static_autocast(adaptive))), info


def _blur_source(dent: Dent, source: Source, adaptive: AdaptiveSection, rewrap: Rewrap,
                 x: Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """The wrapped model behind dent's input blur frozen at its initial width or at the width dent adapts to
    on the natural batch ``x`` (per-input widths: their median, since AutoAttack attacks sub-batches); the
    static model when the defense has no blur."""
    model, info = _static_source(dent, adaptive, rewrap)
    if dent.config.input is InputMode.NONE:
        return model, {**info, "requested": source.value, "why": "the defense has no input blur"}
    sigma = torch.tensor([dent.config.sigma_init], device=x.device)
    if source is Source.ADAPTED_BLUR:
        _predict(rewrap(dent), x)  # adapts on the natural batch; its widths stay readable until the next call
        sigma = dent.adapted_sigma().median().reshape(1)
    blurred = nn.Sequential(FixedBlur(sigma, dent.config.max_kernel_size),
                            StaticModel(dent.model, _static_autocast(adaptive)))
    return rewrap(blurred), {**info, "source": source.value, "sigma": round(float(sigma), 6)}


def _done(robust: dict, pred: dict, notes: dict, x_adv: dict):
    from dent.attacks.registry import AttackOutcome

    return AttackOutcome(robust={k: v.cpu() for k, v in robust.items()}, pred={k: v.cpu() for k, v in pred.items()},
                         notes=notes, x_adv={k: v.detach().cpu() for k, v in x_adv.items()})


# -- transfer: the paper's denied updates (Table 5) -----------------------------------------------


def run_transfer(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int, progress: bool = False):
    """AutoAttack against the source (static model by default), its final inputs submitted to the defense.

    Labels ``SOURCE:LABEL`` with AutoAttack's labels (``ensemble`` and/or each attack, by ``attack.mode``).
    ``notes.source_robust`` holds the per-point result on the source itself (e.g. Table 5's static-static).
    """
    from dent.attacks.autoattack import _collect_log, _reset_dynamic_check, autoattack_runs, build_autoattack

    dent, rewrap = _dent_of(model, "transfer")
    adaptive = _adaptive(point)
    runs = autoattack_runs(point)
    robust, pred, inputs, source_robust, sources, warnings = {}, {}, {}, {}, {}, []
    for source in adaptive.source_list("transfer"):
        attacked, info = _source(dent, source, adaptive, rewrap, x)
        sources[source.value] = info
        for label, attack_list in runs:
            aa = build_autoattack(attacked, point, attack_list, device=device, seed=seed)
            _reset_dynamic_check()
            with _collect_log() as log:
                x_adv, y_source = aa.run_standard_evaluation(x, y, batch_size=len(x))
            warnings += [w for w in log.warnings if w not in warnings]
            key = f"{source.value}:{label}"
            inputs[key] = x_adv.to(x.device)
            pred[key] = _predict(model, inputs[key])
            robust[key] = pred[key] == y
            source_robust[key] = (y_source.to(y.device) == y).cpu().tolist()
    notes = {"sources": sources, "source_robust": source_robust, "warnings": warnings,
             "protocol": "adversarial inputs crafted on the source, then one query of the defense per batch"}
    return _done(robust, pred, notes, inputs)


# -- mixed batches (Table 6) ----------------------------------------------------------------------


def mixed_groups(batch: int, n_adv: int) -> list[tuple[list[int], list[bool]]]:
    """Which inputs of a batch are adversarial in each mixed batch: every input is adversarial in one group.

    Groups are consecutive runs of ``n_adv`` indices, the last one wrapping around to the start so that
    every group has exactly ``n_adv``; ``owned[i]`` is False for an index already adversarial in an earlier
    group (its result is taken from that group).
    """
    if not 1 <= n_adv <= batch:
        raise InvalidInputError(f"need 1 <= adversarial inputs <= batch size, got {n_adv} of {batch}")
    groups = []
    for start in range(0, batch, n_adv):
        index = [(start + i) % batch for i in range(n_adv)]
        owned = [start + i < batch for i in range(n_adv)]
        groups.append((index, owned))
    return groups


class MixedBatch(nn.Module):
    """The defense on a mixed batch: the inputs at ``index`` are the attacker's, the rest stay ``natural``.

    Called on the adversarial part [n_adv, ...]; returns the defense's logits for that part only, computed
    on the whole batch (so the defense adapts on natural and adversarial inputs together). Differentiable
    w.r.t. the adversarial part.
    """

    def __init__(self, defense: nn.Module, natural: Tensor, index: list[int]):
        super().__init__()
        inherit_traits(self, defense)
        self.defense = defense
        self.natural = natural.detach()
        self.index = torch.as_tensor(index, dtype=torch.long, device=natural.device)

    def bpda_surrogate(self) -> nn.Module:
        return MixedBatch(bpda_surrogate(self.defense), self.natural, self.index.tolist())

    def compose(self, adversarial: Tensor) -> Tensor:
        return self.natural.index_put((self.index,), adversarial)

    def forward(self, adversarial: Tensor) -> Tensor:
        if len(adversarial) != len(self.index):
            raise InvalidInputError(
                f"a mixed batch takes exactly {len(self.index)} adversarial inputs, got {len(adversarial)}")
        return self.defense(self.compose(adversarial))[self.index]


def run_mixed(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int, progress: bool = False):
    """Mixed batches: for each share in ``adaptive.mixed`` (label ``mixed SHARE``), every input of the batch
    is attacked once while sitting in a batch of ``adaptive.mixed_batch_size`` (default: the evaluation
    batch) whose other inputs are natural; accuracy is on the adversarial inputs only.

    The APGD variants in ``adaptive.attacks`` optimize the adversarial part through the defense's answer on
    the whole mixed batch (the paper's protocol: the gradient of the final prediction); a point is robust if
    every query and the final mixed batch (each input's best adversarial) classify it correctly.
    """
    adaptive = _adaptive(point)
    budget = _budget(point, "mixed", model)
    subs = adaptive.sub_attacks("mixed")
    size = adaptive.mixed_batch_size or len(x)
    chunks = [list(range(s, min(s + size, len(x)))) for s in range(0, len(x), size)]
    robust, pred, inputs, per_batch, n_groups = {}, {}, {}, {}, {}
    t0 = time.perf_counter()
    for entry in adaptive.mixed:
        label = f"mixed {mix_label(entry)}"
        ok = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        answer = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        chosen = x.clone()
        for chunk in chunks:
            xc, yc = x[chunk], y[chunk]
            n_adv = adv_count(entry, len(chunk))
            per_batch.setdefault(label, []).append([n_adv, len(chunk)])
            groups = mixed_groups(len(chunk), n_adv)
            n_groups[label] = n_groups.get(label, 0) + len(groups)
            for index, owned in groups:
                mixed = MixedBatch(model, xc, index)
                x_part, y_part = xc[index], yc[index]
                still = torch.ones(n_adv, dtype=torch.bool, device=x.device)
                best = x_part.clone()
                for sub in subs:
                    res = apgd_batch(gradient_view(mixed), x_part, y_part, attack=sub, norm=point.norm, eps=point.eps, seed=seed,
                                     **budget)
                    broken_now = still & ~res.robust
                    best[broken_now] = res.x_adv[broken_now]
                    best[still & res.robust] = res.x_adv[still & res.robust]
                    still &= res.robust
                final = _predict(mixed, best)
                still &= final == y_part
                mine = torch.as_tensor(owned, device=x.device)
                where = torch.as_tensor([chunk[i] for i in index], device=x.device)[mine]
                ok[where] = still[mine]
                answer[where] = final[mine]
                chosen[where] = best[mine]
        robust[label], pred[label], inputs[label] = ok, answer, chosen
    notes = {
        "mixed_batch_size": size,
        "adversarial_per_batch": per_batch,  # label -> [[n_adv, batch size] per evaluation sub-batch]
        "mixed_batches": n_groups,  # label -> attacked mixed batches (each input adversarial in one)
        "attacks": list(subs),
        "budget": budget,
        "natural_part": "the other inputs of the same evaluation batch, unperturbed",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _done(robust, pred, notes, inputs)


# -- through the adaptation -----------------------------------------------------------------------


def _apgd_runs(attacked: nn.Module, defense: nn.Module, x: Tensor, y: Tensor, point: Any, name: str,
               subs: tuple[str, ...], seed: int, prefix: str = "") -> tuple[dict, dict, dict, dict]:
    """Each APGD variant on the whole batch against ``attacked``; results checked on ``defense``; the last
    dict holds each variant's adversarial inputs."""
    budget = _budget(point, name, defense)
    robust, pred, inputs, timing = {}, {}, {}, {}
    for sub in subs:
        t0 = time.perf_counter()
        res = apgd_batch(attacked, x, y, attack=sub, norm=point.norm, eps=point.eps, seed=seed, **budget)
        seconds = time.perf_counter() - t0
        label = prefix + sub
        inputs[label] = res.x_adv
        pred[label] = _predict(defense, res.x_adv)
        robust[label] = res.robust & (pred[label] == y)
        timing[label] = {"seconds": round(seconds, 3), "queries": res.queries,
                         "seconds_per_query": round(seconds / max(res.queries, 1), 5)}
    return robust, pred, {"budget": budget, "timing": timing}, inputs


def run_through_adaptation(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int,
                           progress: bool = False):
    """APGD (``adaptive.attacks``) whose gradient differentiates through the defense's adaptation steps.

    The attacked function is :class:`~dent.defenses.differentiable.DifferentiableDent`, whose answers are
    the defense's own; ``adaptive.horizon`` truncates the differentiated steps, ``adaptive.checkpoint``
    recomputes them in the backward pass. ``notes.gradient`` records which was used.
    """
    dent, rewrap = _dent_of(model, "through_adaptation")
    adaptive = _adaptive(point)
    differentiable = DifferentiableDent(dent, horizon=adaptive.horizon, checkpoint=adaptive.checkpoint)
    attacked = rewrap(differentiable)
    robust, pred, notes, inputs = _apgd_runs(attacked, rewrap(dent), x, y, point, "through_adaptation",
                                             adaptive.sub_attacks("through_adaptation"), seed)
    notes["gradient"] = differentiable.describe()
    return _done(robust, pred, notes, inputs)


# -- BPDA + EOT on a shortened defense ------------------------------------------------------------


def run_bpda_eot(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int, progress: bool = False):
    """APGD on the defense's answers with the gradient of a shortened (``adaptive.short_steps``) defense,
    differentiated through its adaptation and averaged over ``attack.eot_iter`` noisy copies."""
    dent, rewrap = _dent_of(model, "bpda_eot")
    adaptive = _adaptive(point)
    if dent.config.steps == 0:
        approximation: nn.Module = dent
        gradient: dict[str, Any] = {"steps": 0, "differentiated_steps": 0}
    else:
        short = DifferentiableDent(shortened(dent, _shortened_steps(dent, adaptive)), checkpoint=adaptive.checkpoint)
        approximation, gradient = short, short.describe()
    attacked = BPDA(rewrap(dent), rewrap(approximation), noise=adaptive.eot_noise)
    robust, pred, notes, inputs = _apgd_runs(attacked, rewrap(dent), x, y, point, "bpda_eot",
                                             adaptive.sub_attacks("bpda_eot"), seed)
    notes["gradient"] = {**gradient, "eot_noise": adaptive.eot_noise}
    return _done(robust, pred, notes, inputs)


# -- transfer from stronger surrogates --------------------------------------------------------------


def run_surrogate_transfer(model: nn.Module, x: Tensor, y: Tensor, point: Any, *, device, seed: int,
                           progress: bool = False):
    """APGD (default targeted DLR, 3 restarts, 9 targets) against each surrogate in ``adaptive.sources``
    (static model; shortened defense differentiated through its adaptation); every candidate (each run's
    highest-loss and breaking iterates, and the final pick) is submitted to the defense as a whole batch.
    A point is robust if the defense classifies it correctly in every candidate batch (label
    ``SOURCE:ATTACK``); ``notes.surrogate_robust`` is the result on the surrogate itself."""
    dent, rewrap = _dent_of(model, "surrogate_transfer")
    adaptive = _adaptive(point)
    budget = _budget(point, "surrogate_transfer", model)
    robust, pred, inputs, surrogate_robust, sources, timing = {}, {}, {}, {}, {}, {}
    for source in adaptive.source_list("surrogate_transfer"):
        surrogate, info = _source(dent, source, adaptive, rewrap, x)
        sources[source.value] = info
        for sub in adaptive.sub_attacks("surrogate_transfer"):
            label = f"{source.value}:{sub}"
            t0 = time.perf_counter()
            res = apgd_batch(surrogate, x, y, attack=sub, norm=point.norm, eps=point.eps, seed=seed, **budget)
            candidates = [res.x_adv] + [c for run in res.runs for c in run]
            ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
            answer, chosen = None, candidates[0].clone()
            seen: list[Tensor] = []
            for cand in candidates:
                if any(torch.equal(cand, s) for s in seen):
                    continue
                seen.append(cand)
                p = _predict(model, cand)
                # still-robust points take the latest answer and input; broken ones keep those that broke them
                answer = p.clone() if answer is None else torch.where(ok, p, answer)
                chosen[ok] = cand[ok]
                ok &= p == y
            robust[label], pred[label], inputs[label] = ok, answer, chosen
            surrogate_robust[label] = res.robust.cpu().tolist()
            timing[label] = {"seconds": round(time.perf_counter() - t0, 3), "candidates": len(seen)}
    notes = {"sources": sources, "surrogate_robust": surrogate_robust, "budget": budget, "timing": timing}
    return _done(robust, pred, notes, inputs)


def adaptive_attack(defense: nn.Module, x: Tensor, y: Tensor, name: str, *, eps: float, norm: str = "Linf",
                    n_iter: int | None = None, n_restarts: int | None = None, n_target_classes: int | None = None,
                    eot_iter: int | None = None, seed: int = 0, version: str = "standard",
                    attacks: tuple[str, ...] = (), **adaptive: Any):
    """Run the adaptive attack ``name`` on one batch from Python, with ``attack.adaptive`` keys as keywords.

    E.g. ``adaptive_attack(Dent(model, cfg), x, y, "through_adaptation", eps=8/255, n_iter=100,
    horizon=None, checkpoint=True)``, or ``"batch_mates"`` with ``batch_mates=[4]`` (its own module). ``attacks`` lists the APGD variants (``adaptive.attacks``), or for
    ``transfer`` AutoAttack's custom list (with ``version="custom"``). Returns the
    :class:`~dent.attacks.registry.AttackOutcome` (per-point ``robust`` and ``pred`` per label, ``notes``, and the
    adversarial inputs ``x_adv`` per label; ``worst_case_inputs()`` picks each point's worst). Resubmitted as
    the batch they came in, the inputs of ``transfer``, ``through_adaptation`` and ``bpda_eot`` reproduce
    ``pred``; those of ``mixed`` were answered beside natural batch-mates, and those of ``surrogate_transfer``
    in the candidate batch that broke them, so a batch-wise defense answers them differently in another batch.
    """
    from dent.attacks.config import AttackSection
    from dent.attacks.registry import ATTACKS

    if name not in ADAPTIVE_ATTACKS:
        raise InvalidInputError(f"unknown adaptive attack {name!r}; valid: {', '.join(ADAPTIVE_ATTACKS)}")
    if name == "transfer":
        extra: dict[str, Any] = {"version": version, "attacks": list(attacks)}
    else:
        extra = {}
        if attacks:
            adaptive["attacks"] = list(attacks)
    section = AttackSection(
        name=name, threats=[{"norm": norm, "eps": eps}], n_iter=[n_iter] if n_iter else [], n_restarts=n_restarts,
        n_target_classes=n_target_classes, eot_iter=eot_iter, adaptive=adaptive, **extra,
    )
    return ATTACKS.get(name)(defense, x, y, section.points()[0], device=x.device, seed=seed)


ADAPTIVE_RUNNERS = {
    "transfer": run_transfer,
    "mixed": run_mixed,
    "through_adaptation": run_through_adaptation,
    "bpda_eot": run_bpda_eot,
    "surrogate_transfer": run_surrogate_transfer,
}
