"""``dent train --dry-run``: what a training run would do and roughly how long, without training or writing.

The estimate times one optimizer step of the recipe on one batch of the real training data (attack, AWP and
extra modules included) and one held-out evaluation batch, on a throwaway copy of the freshly built model.
"""

from __future__ import annotations

import time

import torch

from dent.training.config import TrainConfig
from dent.training.recipes import RECIPES, StepContext
from dent.training.trainer import CHECKPOINT_FILE, Trainer, load_checkpoint, prepare_data, training_run_dir


def dry_run(cfg: TrainConfig) -> str:
    recipe = RECIPES.get(cfg.train.recipe)
    run_dir = training_run_dir(cfg)
    checkpoint = run_dir / CHECKPOINT_FILE
    if recipe.detector is not None:
        return (f"dry run: nothing was computed or written; run directory {run_dir}\n"
                f"{cfg.train.recipe} fits a detector around {cfg.model.arch} (no epochs to estimate)")
    done = int(load_checkpoint(checkpoint)["epoch"]) if checkpoint.is_file() else 0
    trainer = Trainer(cfg, prepare_data(cfg), run_dir=run_dir, progress=False, console=False)
    trainer.setup()
    t = trainer.tcfg
    x = trainer.data.train.images[: t.batch_size].to(trainer.device)
    y = trainer.data.train.labels[: t.batch_size].to(trainer.device)
    ctx = StepContext(trainer.model, t, torch.Generator().manual_seed(0), trainer.extras, trainer.frozen)
    trainer._train_mode(True)
    start = time.perf_counter()
    trainer._update(ctx, x, y, epoch=1, i=0)
    step_s = time.perf_counter() - start
    trainer._train_mode(False)
    start = time.perf_counter()
    batch = trainer.data.holdout.subset(range(min(t.eval.batch_size, len(trainer.data.holdout))))
    if recipe.evaluate is not None:
        recipe.evaluate(trainer.model, batch.images.to(trainer.device), t)
    else:
        trainer._evaluate(batch)
    eval_s = (time.perf_counter() - start) * len(trainer.data.holdout) / max(len(batch), 1)
    left = t.epochs - done
    seconds = left * (trainer.steps_per_epoch * step_s + eval_s)
    return "\n".join([
        f"dry run: nothing was computed or written; run directory {run_dir}",
        f"recipe {recipe.name}, {cfg.model.arch}: {len(trainer.data.train)} training images, {trainer.steps_per_epoch} "
        f"steps of {t.batch_size} per epoch, epochs {done + 1}..{t.epochs} of {t.epochs} to run"
        + (f" (a checkpoint at epoch {done} exists: pass --resume)" if done else ""),
        f"one step {step_s:.2f} s, one held-out evaluation {eval_s:.1f} s on {trainer.device} "
        f"({torch.get_num_threads()} threads)",
        f"estimate: {seconds / 60:.0f} min on this machine",
    ])
