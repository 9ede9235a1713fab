"""The one training loop shared by every recipe: data, schedule, evaluation, checkpoints and resume.

Determinism: all randomness of an epoch (shuffling, augmentation, attack random starts) comes from a
``torch.Generator`` seeded with (``seed``, epoch); the global torch / numpy / python RNG states, model,
optimizer, scheduler and recipe modules are saved in every checkpoint. So on the CPU a run stopped after
epoch k and resumed ends with exactly the weights of an uninterrupted run. Under torchrun the same holds for
a run of N processes (:mod:`.distributed`: what is global, what is per rank; rank 0 writes).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dent.confbase import as_section
from dent.data.split import Split
from dent.errors import ConfigError, CorruptFileError, DentError
from dent.identity import model_identity, refuse_mixing, result_tree
from dent.outputs import RUN_DIR_HINT, output_dir, writing
from dent.provenance import machine_description, write_run_metadata
from dent.runtime import resolve_device
from dent.training.adversaries import model_mode
from dent.training.augment import random_crop_flip
from dent.threat import format_eps
from dent.tracking import Tracking, open_tracker
from dent.training.config import BnMode, OptimizerName, Schedule, TrainConfig, TrainSection
from dent.training.curves import plot_curves, write_history
from dent.training.distributed import World, session
from dent.training.awp import frozen_bn_statistics, perturbed, weight_perturbation
from dent.training.recipes import RECIPES, ModelBuilder, Recipe, StepContext, StepOutput

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train.log"
CHECKPOINT_FORMAT = "dent-train-checkpoint/1"

log = logging.getLogger("dent.training")


class ResumeError(DentError):
    """A checkpoint cannot be resumed: missing, of another config, or the run directory is already in use."""


class TrainingError(DentError):
    """Training cannot go on (e.g. the loss diverged), usually because of a config value such as the lr."""


# ---------------------------------------------------------------------------------------------------
# Config identity


def training_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of the config that decides what is trained (its hash names the run and guards resume)."""
    return result_tree(cfg)


def training_hash(cfg: TrainConfig) -> str:
    return cfg.result_hash()


def training_run_dir(cfg: TrainConfig) -> Path:
    """``output.root / output.name``, default ``output.root / train-<training hash[:8]>``."""
    return cfg.run_dir("train")


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TrainData:
    train: Split
    holdout: Split


def carve_holdout(full: Split, train_cfg: TrainSection) -> TrainData:
    """Held-out images (class-stratified, ``holdout_seed``) and the training images (the rest, or a
    stratified ``n_images`` of it) from one split."""
    from dent.data.stratify import stratified_indices

    n_hold = train_cfg.holdout
    n_train = train_cfg.n_images
    available = len(full) - n_hold
    if available < 2 or (n_train is not None and n_train > available):
        want = n_train if n_train is not None else 2
        raise ConfigError(
            f"the {full.name} split has {len(full)} images: cannot hold out train.holdout={n_hold} and still "
            f"train on train.n_images={want}; expected holdout + n_images <= {len(full)}"
        )
    if n_train is not None and n_train < 2:
        raise ConfigError(f"train.n_images={n_train}: expected at least 2 training images")
    hold = stratified_indices(full.labels, n_hold, train_cfg.holdout_seed)
    mask = torch.ones(len(full), dtype=torch.bool)
    mask[hold] = False
    rest = torch.nonzero(mask).flatten()
    if n_train is not None:
        rest = rest[stratified_indices(full.labels[rest], n_train, train_cfg.holdout_seed)]
    return TrainData(train=full.subset(rest), holdout=full.subset(hold))


def prepare_data(cfg: TrainConfig) -> TrainData:
    from dent.data import load_split

    full = load_split(cfg.data.dataset, "train", data_dir=cfg.data.dir, download=cfg.data.download)
    return carve_holdout(full, cfg.train)


@torch.no_grad()
def clean_and_pgd_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm, eps: float, step: float, steps: int,
    batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Clean and PGD accuracy of ``model`` in eval mode (its mode is restored), by :func:`dent.attacks.pgd`
    (cross-entropy, one random start seeded per batch; a point counts as broken at any misclassified query)."""
    from dent.attacks.pgd import pgd

    if len(images) == 0:
        return float("nan"), float("nan")
    clean = robust = 0
    with model_mode(model, BnMode.EVAL):
        for b, start in enumerate(range(0, len(images), batch_size)):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            clean += int((model(x).argmax(dim=1) == y).sum())
            result = pgd(model, x, y, norm=norm, eps=eps, n_iter=steps, step_size=step, seed=seed * 100_003 + b)
            robust += int(result.robust.sum())
    return clean / len(images), robust / len(images)


def default_builder(num_classes: int, recipe: Recipe | None = None) -> ModelBuilder:
    """Builds ``model.arch``: a classifier architecture with ``num_classes`` outputs, or a model of the registry
    ``recipe.models`` of a recipe that trains another kind of model."""
    def build(arch: str) -> nn.Module:
        from dent.models import build_model

        if recipe is not None and recipe.models is not None:
            return recipe.models.get(arch)()
        return build_model(arch, num_classes=num_classes)

    return build


def make_optimizer(cfg: TrainSection, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer is OptimizerName.ADAM:
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------------
# Schedule


def lr_factor(schedule: Schedule, step: int, total: int, cycle_peak: float = 0.5) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total``."""
    p = min(step / max(total, 1), 1.0)
    if schedule is Schedule.COSINE:
        return 0.5 * (1 + math.cos(math.pi * p))
    if schedule is Schedule.CYCLIC:  # as in Wong et al.: evaluated after the step, so the first step moves
        p = min((step + 1) / max(total, 1), 1.0)
        return p / cycle_peak if p < cycle_peak else max(0.0, (1 - p) / (1 - cycle_peak))
    if schedule is Schedule.PIECEWISE:
        return 1.0 if p < 0.5 else 0.1 if p < 0.75 else 0.01
    return 1.0


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch; a last batch of fewer than two images per rank is dropped (BatchNorm cannot train on a
    single image; in one process, a last batch of one image)."""
    full, rest = divmod(n_images, batch_size)
    return full + (1 if rest >= 2 * world_size else 0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


# ---------------------------------------------------------------------------------------------------
# RNG state (kept to plain types and tensors so checkpoints load with weights_only=True)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save ``obj`` to ``path`` atomically; a failed write (e.g. a full disk) leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "training checkpoint", "the previous checkpoint is kept: free space and resume (--resume)"):
        with open(tmp, "wb") as f:  # a Python file: write errors arrive as OSError, not torch's RuntimeError
            torch.save(obj, f)
        os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CorruptFileError(f"cannot read training checkpoint {str(path)!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(
            f"{str(path)!r} is not a dent training checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    return state


# ---------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    extras: dict[str, nn.Module]
    history: list[dict[str, Any]]
    status: str  # "running" (stopped by until_epoch), "finished" or "early_stopped"
    epoch: int


@dataclass
class _State:
    epoch: int = 0
    status: str = "running"
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    invocations: list[dict[str, Any]] = field(default_factory=list)  # command, machine, start of each run
    co_prev_acc: Optional[float] = None


class Trainer:
    """Trains ``cfg.model.arch`` with ``cfg.train.recipe`` on ``data``; writes everything into ``run_dir``.

    ``build`` makes a freshly initialized model from an architecture name (default: :func:`dent.models.build_model`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data: TrainData,
        *,
        run_dir: Path | None = None,
        build: ModelBuilder | None = None,
        device: torch.device | str | None = None,
        progress: bool | None = None,
        console: bool = True,
        command: str | None = None,
        world: World | None = None,
    ):
        self.world = world if world is not None else World.current()
        self.cfg = cfg = as_section(TrainConfig, cfg, "Trainer(cfg)")
        self.command = command  # the command line, recorded in the checkpoint and the model card
        self.tcfg: TrainSection = cfg.train
        self.recipe: Recipe = RECIPES.get(cfg.train.recipe)
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else training_run_dir(cfg)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.build = build or default_builder(len(data.train.classes), self.recipe)
        self.progress = (self.tcfg.progress if progress is None else progress) and self.world.is_main
        self.console = console
        self.hash = training_hash(cfg)
        self.world.per_rank_batch(self.tcfg.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(data.train), self.tcfg.batch_size, self.world.size)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(data.train)} training image(s): expected at least 2 to train on")

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the (seeded) model, recipe modules, optimizer and schedule; called by :meth:`run`."""
        from dent.runtime import seed_everything

        seed_everything(self.cfg.seed)
        arch = self.cfg.model.arch
        self.model = self.build(arch).to(self.device)
        self.extras = {k: m.to(self.device) for k, m in self.recipe.extra_modules(self.tcfg, arch, self.build).items()}
        self.frozen = {k: m.to(self.device) for k, m in self.recipe.frozen_modules(self.tcfg, self.build).items()}
        self.frozen_identity = {k: model_identity(m) for k, m in self.frozen.items()}
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.tcfg.lr}]
        for name, module in self.extras.items():
            groups.append({"params": [p for p in module.parameters() if p.requires_grad],
                           "lr": self.recipe.extra_lr(self.tcfg, name)})
        self.optimizer = make_optimizer(self.tcfg, groups)
        total = self.tcfg.epochs * self.steps_per_epoch
        schedule, peak = self.tcfg.schedule, self.tcfg.cycle_peak
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(schedule, step, total, peak)
        )
        self.state = _State()
        self.co_prev_model: Optional[dict[str, torch.Tensor]] = None
        if not self.world.is_main:  # its own dropout stream (the model was built from the common seed)
            seed_everything(self.world.rank_seed(self.cfg.seed))

    def _wrap(self) -> None:
        """The modules the recipe's steps call: in DistributedDataParallel under torchrun (after a restore, so
        DDP's broadcast from rank 0 sends what every rank loaded anyway)."""
        self.trained = self.world.wrap(self.model, self.device)
        self.trained_extras = {k: self.world.wrap(m, self.device) for k, m in self.extras.items()}

    def _checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the current state; every rank calls it (it gathers the ranks' RNG states)."""
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": s.epoch,
            "epochs": self.tcfg.epochs,
            "status": s.status,
            "recipe": self.recipe.name,
            "arch": self.cfg.model.arch,
            "config": training_config(self.cfg),
            "config_hash": self.hash,
            "model": self.model.state_dict(),
            "extras": {k: m.state_dict() for k, m in self.extras.items()},
            "frozen": self.frozen_identity,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "world_size": self.world.size,
            **({"rank_rng": self.world.gather(rng_state())} if self.world.distributed else {}),
            "history": s.history,
            "wall_time_s": s.wall_time_s,
            "invocations": s.invocations,
            "early_stop": {"prev_acc": s.co_prev_acc},
        }

    def _restore(self, ckpt: dict[str, Any], source: Path) -> None:
        if ckpt.get("config_hash") != self.hash:
            refuse_mixing(
                ckpt.get("config", {}), training_config(self.cfg), error=ResumeError,
                problem=f"cannot resume from {str(source)!r}: it was written by another training config "
                        f"(hash {str(ckpt.get('config_hash'))[:8]}, expected {self.hash[:8]}).",
                advice="Resume with the same config, or start a new run (another output.name).",
            )
        if ckpt.get("frozen", {}) != self.frozen_identity:
            raise ResumeError(
                f"cannot resume from {str(source)!r}: its fixed modules (e.g. the distillation teacher) had other "
                f"weights: stored {ckpt.get('frozen', {})}, now {self.frozen_identity}. Resume with the same "
                "teacher, or start a new run (another output.name)."
            )
        stored_world = int(ckpt.get("world_size", 1))
        if stored_world != self.world.size:
            raise ResumeError(
                f"cannot resume from {str(source)!r}: it was trained by {stored_world} process(es), this run has "
                f"{self.world.size} (torchrun --nproc_per_node): each rank's shard, random stream and BatchNorm "
                f"statistics would change, so it could not continue bit for bit. Resume with {stored_world} "
                "process(es), or start a new run (another output.name)."
            )
        self.model.load_state_dict(ckpt["model"])
        for name, module in self.extras.items():
            module.load_state_dict(ckpt["extras"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rank_rng"][self.world.rank] if self.world.distributed else ckpt["rng"])
        self.state = _State(
            epoch=int(ckpt["epoch"]), status=ckpt["status"], history=list(ckpt["history"]),
            wall_time_s=float(ckpt["wall_time_s"]), invocations=list(ckpt["invocations"]),
            co_prev_acc=ckpt["early_stop"]["prev_acc"],
        )
        if self.tcfg.early_stop.enabled:
            self.co_prev_model = copy.deepcopy(self.model.state_dict())

    def _resume_source(self, resume: bool | str | Path | None) -> Optional[Path]:
        own = self.run_dir / CHECKPOINT_FILE
        if isinstance(resume, (str, Path)):
            source = Path(resume)
            source = source / CHECKPOINT_FILE if source.is_dir() else source
            if not source.is_file():
                raise ResumeError(f"cannot resume: no checkpoint at {str(source)!r} (expected a file or a run directory "
                                  f"holding {CHECKPOINT_FILE})")
            return source
        if resume or self.tcfg.resume:
            if own.is_file():
                return own
            log.info("no checkpoint in %s yet: starting from epoch 0", self.run_dir)
            return None
        if own.is_file():
            raise ResumeError(
                f"the run directory {str(self.run_dir)!r} already holds a checkpoint; pass --resume "
                "(or train.resume true) to continue it, or choose another output.name to start a new run"
            )
        return None

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, until_epoch: int | None = None, resume: bool | str | Path | None = None) -> TrainResult:
        """Train up to ``until_epoch`` (default ``train.epochs``), resuming when asked; returns the result."""
        main = self.world.is_main
        if main:
            output_dir(self.run_dir, "training run directory", RUN_DIR_HINT)
        handlers = self._attach_log() if main else []
        self.tracker = open_tracker(self.cfg.output.tracking if main else Tracking.NONE, self.run_dir)
        try:
            return self._run(until_epoch, resume)
        finally:
            self.tracker.close()
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()

    def _run(self, until_epoch: int | None, resume: bool | str | Path | None) -> TrainResult:
        total_epochs = self.tcfg.epochs
        end = total_epochs if until_epoch is None else until_epoch
        if not 1 <= end <= total_epochs:
            raise ConfigError(f"until_epoch={until_epoch}: expected 1..{total_epochs} (train.epochs)")
        source = self._resume_source(resume)
        self.setup()
        if source is not None:
            self._restore(load_checkpoint(source, self.device), source)
            log.info("resumed from %s at epoch %d/%d (%s)", source, self.state.epoch, total_epochs, self.state.status)
        self._wrap()
        if self.world.is_main:
            write_run_metadata(self.run_dir, self.cfg.to_dict(), {"distributed": self.world.description()})
        self.tracker.log_config(self.cfg.to_dict())
        self.state.invocations.append({
            "command": self.command or "", "start_epoch": self.state.epoch, "until_epoch": end,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description(),
            "device": str(self.device), "world_size": self.world.size,
        })
        if self.state.status != "running" or self.state.epoch >= end:
            log.info("nothing to train: the run is at epoch %d (%s)", self.state.epoch, self.state.status)
            return self._result()

        log.info(
            "training %s with recipe %s on %d images (%d held out), %d batches of %d per epoch, epochs %d..%d of %d, "
            "device %s, %d process(es), run dir %s", self.cfg.model.arch, self.recipe.name, len(self.data.train),
            len(self.data.holdout), self.steps_per_epoch, self.tcfg.batch_size, self.state.epoch + 1, end, total_epochs,
            self.device, self.world.size, self.run_dir,
        )
        epochs_bar = tqdm(
            total=end, initial=self.state.epoch, desc=f"train {self.recipe.name}", unit="epoch",
            disable=not self.progress, position=0, dynamic_ncols=True, mininterval=_bar_interval(),
        )
        try:
            for epoch in range(self.state.epoch + 1, end + 1):
                entry = self._epoch(epoch)
                epochs_bar.update(1)
                epochs_bar.set_postfix(loss=f"{entry['train_loss']:.3f}")
                if self.state.status == "early_stopped":
                    break
        finally:
            epochs_bar.close()
        return self._result()

    def _epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        tcfg = self.tcfg
        generator = epoch_generator(self.cfg.seed, epoch)
        ctx = StepContext(self.trained, tcfg, self.world.recipe_generator(generator, self.cfg.seed, epoch),
                          self.trained_extras, self.frozen)
        self._train_mode(True)
        images, labels = self.data.train.images, self.data.train.labels
        order = torch.randperm(len(labels), generator=generator)
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch",
                   disable=not self.progress, leave=False, position=1, dynamic_ncols=True,
                   mininterval=_bar_interval())
        for i in bar:
            index = order[i * tcfg.batch_size : (i + 1) * tcfg.batch_size]
            x, y = images[index], labels[index]
            if tcfg.augment:
                x = random_crop_flip(x, generator)
            shard = self.world.shard(len(y))  # augmented as one batch on every rank, so as in one process
            x, y = x[shard].to(self.device), y[shard].to(self.device)
            out = self._update(ctx, x, y, epoch, i, self.world.loss_weight(len(x), len(index)))
            n = len(y)
            seen += n
            sums["train_loss"] += out.loss.item() * n
            for key, value in out.metrics.items():
                sums[key] += value * n
            bar.set_postfix(loss=f"{sums['train_loss'] / seen:.3f}", refresh=False)
        bar.close()
        self._train_mode(False)
        self.world.sync_buffers(self.model)
        for module in self.extras.values():
            self.world.sync_buffers(module)
        sums = self.world.sum({**sums, "_seen": seen})
        seen = sums.pop("_seen")
        train_time = time.perf_counter() - t0

        entry: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        entry.update({key: value / seen for key, value in sums.items()})
        entry["clean_acc"] = entry["robust_acc"] = None
        if self._eval_due(epoch) and self.recipe.evaluate is not None:
            with torch.no_grad():
                entry.update(self.world.from_main(
                    lambda: self.recipe.evaluate(self.model, self.data.holdout.images.to(self.device), tcfg)))
        elif self._eval_due(epoch):
            entry["clean_acc"], entry["robust_acc"] = self._evaluate(self.data.holdout)
        if tcfg.early_stop.enabled:
            self._check_overfitting(epoch, entry)
        elapsed = time.perf_counter() - t0
        self.state.wall_time_s += elapsed
        entry.update(train_time_s=round(train_time, 3), epoch_time_s=round(elapsed, 3),
                     wall_time_s=round(self.state.wall_time_s, 3))
        self.state.epoch = epoch
        if self.state.status == "running" and epoch == tcfg.epochs:
            self.state.status = "finished"
        self.state.history.append(entry)
        checkpoint = self._checkpoint()
        if self.world.is_main:
            atomic_torch_save(checkpoint, self.run_dir / CHECKPOINT_FILE)
            self._write_log_files()
        self.tracker.log_scalars(epoch, entry, prefix="train/")
        log.info("epoch %d/%d: %s", epoch, tcfg.epochs, _summary(entry))
        return entry

    def _update(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int,
                weight: float = 1.0) -> StepOutput:
        """One optimizer step on the recipe's loss; with AWP, the loss and its gradient at perturbed weights.

        ``weight`` scales the loss's gradient (not the loss logged): a rank's share of an unevenly split batch.
        """
        ctx.examples.clear()
        awp = self.tcfg.awp
        perturbation = []
        if awp.active(epoch):
            perturbation = weight_perturbation(self.model, self.recipe.loss(ctx, x, y).loss * weight, awp.gamma,
                                               average=self.world.average)
        second_pass = frozen_bn_statistics(self.model) if perturbation else nullcontext()
        with perturbed(perturbation), second_pass:
            out = self.recipe.loss(ctx, x, y)
            if not torch.isfinite(out.loss):
                raise TrainingError(
                    f"the {self.recipe.name} loss became {out.loss.item()} at epoch {epoch}, batch {i + 1}; "
                    f"expected a finite loss: lower train.lr (now {self.tcfg.lr:g})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (out.loss * weight).backward()
            self.optimizer.step()
        self.scheduler.step()
        return out

    def _train_mode(self, training: bool) -> None:
        self.model.train(training)
        for module in self.extras.values():
            module.train(training)

    def _eval_due(self, epoch: int) -> bool:
        every = self.tcfg.eval.every
        return epoch == self.tcfg.epochs or (every > 0 and epoch % every == 0)

    def _evaluate(self, split: Split) -> tuple[float, float]:
        """Clean and PGD accuracy on ``split``, measured by rank 0 and known to every rank (the early stop)."""
        t = self.tcfg
        return self.world.from_main(lambda: clean_and_pgd_accuracy(
            self.model, split.images, split.labels, norm=t.eval_norm, eps=t.eval_eps, step=t.eval_step,
            steps=t.eval.steps, batch_size=t.eval.batch_size, seed=t.eval.seed, device=self.device,
        ))

    def _check_overfitting(self, epoch: int, entry: dict[str, Any]) -> None:
        """Wong et al.'s early stop: PGD accuracy on a held-out batch falls by more than ``drop`` in one epoch."""
        es = self.tcfg.early_stop
        batch = self.data.holdout.subset(range(min(es.n_images, len(self.data.holdout))))
        _, acc = self._evaluate(batch)
        entry["co_check_acc"] = acc
        prev = self.state.co_prev_acc
        if prev is not None and es.rule.fell(prev, acc, es.drop) and self.co_prev_model is not None:
            self.model.load_state_dict(self.co_prev_model)
            self.state.status = "early_stopped"
            entry["early_stopped"] = True
            log.warning(
                "catastrophic overfitting at epoch %d: PGD accuracy on %d held-out images fell from %.1f%% to %.1f%% "
                "(more than train.early_stop.drop=%g, %s); stopping and keeping the weights of epoch %d",
                epoch, len(batch), 100 * prev, 100 * acc, es.drop, es.rule.value, epoch - 1,
            )
            entry["clean_acc"], entry["robust_acc"] = self._evaluate(self.data.holdout)  # of the weights kept
            return
        self.state.co_prev_acc = acc
        self.co_prev_model = copy.deepcopy(self.model.state_dict())

    # -- outputs -----------------------------------------------------------------------------------

    def _history_doc(self) -> dict[str, Any]:
        t = self.tcfg
        return {
            "recipe": self.recipe.name,
            "arch": self.cfg.model.arch,
            "config_hash": self.hash,
            "status": self.state.status,
            "epochs_planned": t.epochs,
            "n_train": len(self.data.train),
            "n_holdout": len(self.data.holdout),
            "robust_label": f"PGD-{t.eval.steps} {t.eval_norm.value} {format_eps(t.eval_eps, t.eval_norm)}",
            "wall_time_s": round(self.state.wall_time_s, 3),
            "world_size": self.world.size,
            **({"frozen": self.frozen_identity} if self.frozen_identity else {}),  # e.g. the teacher's digest
            "epochs": self.state.history,
        }

    def _write_log_files(self) -> None:
        doc = self._history_doc()
        write_history(self.run_dir, doc)
        try:
            plot_curves(self.run_dir, doc)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop training
            log.warning("could not draw the training curves: %s", exc)

    def _attach_log(self) -> list[logging.Handler]:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [logging.FileHandler(self.run_dir / LOG_FILE, mode="a")]
        if self.console:
            handlers.append(logging.StreamHandler(sys.stderr))
        for handler in handlers:
            handler.setFormatter(fmt)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        return handlers

    def _result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.model, self.extras, self.state.history, self.state.status,
                           self.state.epoch)


def _bar_interval() -> float:
    """Seconds between progress-bar refreshes: often on a terminal, rarely when stderr goes to a file."""
    return 0.5 if sys.stderr.isatty() else 30.0


def _summary(entry: dict[str, Any]) -> str:
    parts = [f"loss {entry['train_loss']:.4f}", f"lr {entry['lr']:.4g}"]
    if entry.get("clean_acc") is not None:
        parts.append(f"held-out clean {100 * entry['clean_acc']:.1f}% PGD {100 * entry['robust_acc']:.1f}%")
    if entry.get("heldout_bits_per_dim") is not None:
        parts.append(f"held-out {entry['heldout_bits_per_dim']:.3f} bits/dim")
    if "co_check_acc" in entry:
        parts.append(f"CO check {100 * entry['co_check_acc']:.1f}%")
    parts.append(f"{entry['epoch_time_s']:.1f}s")
    return ", ".join(parts)


def train(
    cfg: TrainConfig,
    *,
    until_epoch: int | None = None,
    resume: bool | str | Path | None = None,
    data: TrainData | None = None,
    build: ModelBuilder | None = None,
    run_dir: Path | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    console: bool = True,
    command: str | None = None,
) -> TrainResult:
    """Train as ``cfg`` says (loading CIFAR and building the model unless ``data`` / ``build`` are given); under
    torchrun, as one of its ranks (:func:`dent.training.distributed.session`).

    ``cfg`` may also be a plain dict of config keys (validated, missing keys at their defaults).
    """
    cfg = as_section(TrainConfig, cfg, "train(cfg)")
    if RECIPES.get(cfg.train.recipe).detector is not None:
        raise ConfigError(f"train.recipe {cfg.train.recipe} fits a detector: use dent.training.detectors.fit_detector")
    if build is None:  # fail on a bad architecture name before loading data or creating the run directory
        from dent.models import ARCHITECTURES

        (RECIPES.get(cfg.train.recipe).models or ARCHITECTURES).get(cfg.model.arch)
        if RECIPES.get(cfg.train.recipe).name == "dynat" and cfg.train.dynat.guide_arch:
            ARCHITECTURES.get(cfg.train.dynat.guide_arch)
    with session(cfg, device) as (world, rank_device):  # the trainer (and its DDP modules) go before the session
        return Trainer(cfg, data if data is not None else prepare_data(cfg), run_dir=run_dir, build=build,
                       device=rank_device, progress=progress, console=console, command=command,
                       world=world).run(until_epoch=until_epoch, resume=resume)


__all__ = [
    "CHECKPOINT_FILE", "ResumeError", "TrainData", "TrainResult", "Trainer", "TrainingError", "carve_holdout",
    "load_checkpoint", "lr_factor", "prepare_data", "train", "training_config", "training_hash", "training_run_dir",
]
