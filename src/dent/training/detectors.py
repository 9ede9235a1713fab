"""Fitting a detector around a trained model: ``dent train`` with a detector recipe (``kde_detector``,
``subnetwork_detector``).

The model ``model.arch`` names (a trained model of `dent models`) is fixed. Its PGD examples (``train.attack``)
of the ``train.n_images`` training images and of the held-out ones are made once, batch by batch, and kept in the
run directory (``adversarial.pt``), so an interrupted run loses at most one batch. The detector is fitted on the
pairs whose clean image the model classifies correctly and whose PGD example it misclassifies (Feinman et al.'s
successful adversarial examples): the kernel density on one half of them (clean features, true labels) and the
logistic regression on the other half, or the subnetwork on all. Its threshold is then set at ``train.detector.fpr``
on the held-out clean images, and the held-out ROC AUC and true-positive rate are measured on the held-out pairs.
``--export NAME`` writes the detector and its card next to the other stored detectors.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dent.defenses.detection import Detector, layer_names
from dent.defenses.detection.base import scores_of
from dent.defenses.detection.stored import DETECTOR_CLASSES, DETECTOR_DIR, save_detector
from dent.errors import ConfigError, CorruptFileError
from dent.evaluation.detection import roc_auc, roc_auc_interval, tpr_at_fpr
from dent.outputs import writing
from dent.evaluation.summary import machine_text
from dent.provenance import write_run_metadata
from dent.training.adversaries import pgd_examples
from dent.training.config import TrainConfig
from dent.training.recipes import RECIPES
from dent.training.trainer import TrainData, atomic_torch_save, prepare_data, training_run_dir

log = logging.getLogger(__name__)

DETECTOR_FILE, EXAMPLES_FILE, METRICS_FILE = "detector.safetensors", "adversarial.pt", "metrics.json"


@dataclass
class DetectorResult:
    run_dir: Path
    detector: Detector
    metrics: dict[str, Any]


def detector_params(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments that build the recipe's detector class around the model (stored with it)."""
    section, kind = cfg.train.detector, RECIPES.get(cfg.train.recipe).detector
    if kind == "kde_uncertainty":
        return {"bandwidth": section.bandwidth, "passes": section.passes, "dropout": section.dropout}
    return {"layer": section.layer, "width": section.width}


def build_detector(cfg: TrainConfig, model: nn.Module) -> Detector:
    """The recipe's (untrained) detector around ``model``; a layer the model does not have is a config error
    listing its layers."""
    params = detector_params(cfg)
    if "layer" in params and params["layer"] not in layer_names(model):
        raise ConfigError(f"train.detector.layer {params['layer']!r} is not a layer of {cfg.model.arch}; its layers "
                          f"(named_modules): {', '.join(layer_names(model))}")
    return DETECTOR_CLASSES.get(RECIPES.get(cfg.train.recipe).detector)(model, **params)


def watched_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The trained model ``model.arch`` names, in eval mode with frozen weights."""
    from dent.models import PRETRAINED, load_model

    if cfg.model.arch not in PRETRAINED:
        raise ConfigError(f"train.recipe {cfg.train.recipe} fits a detector around a trained model: model.arch "
                          f"{cfg.model.arch!r} must be a named model; named models: {', '.join(PRETRAINED.names())}")
    model = load_model(cfg.model.arch, download=cfg.data.download).to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def examples_key(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> str:
    """What the PGD examples of ``images`` depend on: the model's weights, the images, the attack, the batches
    and the seed (not the detector: both detector recipes may share one file)."""
    from dent.confbase import config_hash
    from dent.identity import data_digest, model_identity

    return config_hash({"model": model_identity(model)["digest"], "data": data_digest(images.cpu(), labels.cpu()),
                        "attack": cfg.train.attack.to_dict(), "batch_size": cfg.train.batch_size, "seed": cfg.seed})


def adversarial_examples(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                         file: Path, what: str) -> tuple[torch.Tensor, int]:
    """PGD examples of ``images`` (``train.attack``), made batch by batch and saved after each batch to ``file``
    (resumed from it, if it was made for the same :func:`examples_key`), each batch seeded by ``seed`` and its
    index; and how many batches were read from the file instead of made."""
    a = cfg.train.attack
    key = examples_key(model, images, labels, cfg)
    done = kept_examples(file, key)
    resumed = len(done)
    batches = list(zip(images.split(cfg.train.batch_size), labels.split(cfg.train.batch_size)))
    for index, (x, y) in enumerate(batches[len(done):], start=len(done)):
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + index)
        done.append(pgd_examples(model, x, y, norm=a.norm, eps=a.eps, step=a.step_size, steps=a.steps,
                                 random_init=a.random_start, generator=generator).detach().cpu())
        atomic_torch_save({"key": key, "batches": done}, file)
        log.info("%s: PGD examples of batch %d/%d", what, index + 1, len(batches))
    return (torch.cat(done).to(images.device) if done else images[:0]), resumed


def kept_examples(file: Path, key: str) -> list[torch.Tensor]:
    """The batches of PGD examples kept in ``file`` (none if it does not exist); made for another key: refused."""
    if not file.is_file():
        return []
    try:
        kept = torch.load(file, weights_only=True)
        stored, batches = kept["key"], list(kept["batches"])
    except Exception as exc:  # noqa: BLE001 - any unreadable or foreign file is reported the same way
        raise CorruptFileError(f"cannot read the PGD examples kept in {file} ({str(exc)[:200]}); delete it to make "
                               "them again") from None
    if stored != key:
        raise ConfigError(f"the PGD examples kept in {file} were made for another model, data, train.attack, "
                          "batch size or seed; delete the file to make them again, or choose another output.name")
    return batches


def successful_pairs(model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    """[N] bool: the model classifies the clean image correctly and its adversarial example wrongly."""
    from dent.evaluation.accuracy import predict

    device, labels_cpu = labels.device, labels.cpu()
    right = predict(model, clean, batch_size, device, progress=False) == labels_cpu
    fooled = predict(model, adversarial, batch_size, device, progress=False) != labels_cpu
    return (right & fooled).to(device)


def fit(detector: Detector, cfg: TrainConfig, clean: torch.Tensor, adversarial: torch.Tensor,
        labels: torch.Tensor) -> None:
    """Fit ``detector`` on the successful pairs (module docstring), seeded by ``seed`` (MC dropout, the
    subnetwork's initialization and batches)."""
    section, batch = cfg.train.detector, cfg.train.batch_size
    torch.manual_seed(cfg.seed)
    if RECIPES.get(cfg.train.recipe).detector == "kde_uncertainty":
        density = alternate_within_classes(labels)
        regression = ~density
        detector.fit(clean[density], labels[density], clean[regression], adversarial[regression], batch_size=batch)
    else:
        detector.fit(clean, adversarial, epochs=section.epochs, lr=section.lr, batch_size=batch)


def alternate_within_classes(labels: torch.Tensor) -> torch.Tensor:
    """[N] bool: every second image of each class (its 1st, 3rd, ...), so both halves hold every class."""
    chosen = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    for label in labels.unique():
        chosen[torch.nonzero(labels == label).flatten()[::2]] = True
    return chosen


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """The ``provenance.json`` written at the start of the run (machine and numerics)."""
    return json.loads((run_dir / "provenance.json").read_text())


def fit_detector(cfg: TrainConfig, *, data: Optional[TrainData] = None, model: Optional[nn.Module] = None,
                 run_dir: Optional[Path] = None, device: torch.device | str | None = None,
                 command: str | None = None) -> DetectorResult:
    """Fit, calibrate and measure ``cfg``'s detector (module docstring); everything goes into the run directory."""
    from dent.runtime import resolve_device, seed_everything
    from dent.training.distributed import single_process_only

    single_process_only(f"train.recipe {cfg.train.recipe} (fitting a detector around a trained model, outside the "
                        "epoch loop)")

    seed_everything(cfg.seed)
    recipe = RECIPES.get(cfg.train.recipe)
    if recipe.detector is None:
        raise ConfigError(f"train.recipe {recipe.name} trains a model, not a detector: use dent.training.train")
    device = resolve_device(device or cfg.device)
    model = model if model is not None else watched_model(cfg, device)
    detector = build_detector(cfg, model)
    data = data if data is not None else prepare_data(cfg)
    run_dir = Path(run_dir) if run_dir is not None else training_run_dir(cfg)
    write_run_metadata(run_dir, cfg.to_dict())
    start = time.time()
    parts, resumed = {}, 0
    for what, split in (("train", data.train), ("holdout", data.holdout)):
        images, labels = split.images.to(device), split.labels.to(device)
        adversarial, kept = adversarial_examples(model, images, labels, cfg, run_dir / f"{what}-{EXAMPLES_FILE}", what)
        resumed += kept
        keep = successful_pairs(model, images, adversarial, labels, cfg.train.batch_size)
        parts[what] = (images, adversarial, labels, keep)
    images, adversarial, labels, keep = parts["train"]
    if int(keep.sum()) < 4:
        raise ConfigError(f"only {int(keep.sum())} of {len(keep)} training images give a successful PGD example "
                          "(clean right, adversarial wrong): raise train.n_images or train.attack.eps")
    fit(detector, cfg, images[keep], adversarial[keep], labels[keep])
    clean_holdout, adversarial_holdout, _, keep_holdout = parts["holdout"]
    detector.calibrate(clean_holdout, cfg.train.detector.fpr, cfg.train.batch_size)
    metrics = holdout_metrics(detector, cfg, clean_holdout, adversarial_holdout[keep_holdout])
    metrics.update(n_fit_pairs=int(keep.sum()), n_train_images=len(keep), wall_time_s=round(time.time() - start, 1),
                   pgd_batches_resumed=resumed,
                   machine=f"{machine_text(read_provenance(run_dir))}, float32", date=time.strftime("%Y-%m-%d", time.gmtime()),
                   command=command or "", watched=cfg.model.arch, config_hash=cfg.result_hash())
    save_detector(detector, recipe.detector, detector_params(cfg), run_dir / DETECTOR_FILE)
    with writing(run_dir / METRICS_FILE, "detector metrics"):
        (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    log.info("detector %s of %s: held-out ROC AUC %.3f, TPR %.3f at FPR %.3f", recipe.name, cfg.model.arch,
             metrics["roc_auc"], metrics["tpr"], metrics["fpr"])
    return DetectorResult(run_dir, detector, metrics)


def holdout_metrics(detector: Detector, cfg: TrainConfig, clean: torch.Tensor,
                    adversarial: torch.Tensor) -> dict[str, Any]:
    """ROC AUC and the true-positive rate at the calibrated threshold, held-out clean vs successful PGD examples."""
    clean_scores = scores_of(detector, clean, cfg.train.batch_size)
    if len(adversarial) == 0:
        return {"threshold": float(detector.threshold), "fpr": cfg.train.detector.fpr, "n_clean": len(clean),
                "n_adversarial": 0, "roc_auc": float("nan"), "roc_auc_interval": None, "tpr": float("nan"),
                "tpr_interval": None}
    adversarial_scores = scores_of(detector, adversarial, cfg.train.batch_size)
    tpr = tpr_at_fpr(clean_scores, adversarial_scores, cfg.train.detector.fpr)
    auc = roc_auc(clean_scores, adversarial_scores)
    return {"threshold": float(detector.threshold), "fpr": cfg.train.detector.fpr,
            "measured_fpr": float((clean_scores > detector.threshold).double().mean()), "n_clean": len(clean),
            "n_adversarial": len(adversarial), "roc_auc": auc,
            "roc_auc_interval": list(roc_auc_interval(auc, len(clean), len(adversarial))),
            "tpr": tpr.value, "tpr_interval": list(tpr.interval)}


def export_detector(run_dir: Path, name: str, directory: Optional[Path] = None) -> tuple[Path, Path]:
    """Copy a finished run's detector to ``directory/<name>.safetensors`` (default: the stored detectors) and
    write its card ``<name>.md``."""
    from dent.training.export import export_directory

    run_dir = Path(run_dir)
    directory, in_package = export_directory(directory, DETECTOR_DIR)
    source, metrics_file = run_dir / DETECTOR_FILE, run_dir / METRICS_FILE
    if not source.is_file() or not metrics_file.is_file():
        raise ConfigError(f"{run_dir} holds no fitted detector ({DETECTOR_FILE}, {METRICS_FILE}): run the detector "
                          "recipe to the end first")
    metrics = json.loads(metrics_file.read_text())
    config = (run_dir / "config.yaml").read_text()
    weights, card = directory / f"{name}.safetensors", directory / f"{name}.md"
    with writing(weights, "stored detector"):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, weights)
        card.write_text(detector_card(name if in_package else str(weights), metrics, config, title=name))
    return weights, card


def detector_card(name: str, metrics: dict[str, Any], config: str, title: str | None = None) -> str:
    """The card of a stored detector: what it watches, how it was fitted, what it measured held out; ``name``: how
    the ``detector`` kind finds it (its stored name, or its file's path outside the package)."""
    from dent.training.export import license_lines

    terms = "\n".join(license_lines("detector"))
    low, high = metrics["tpr_interval"] or (float("nan"), float("nan"))
    auc_low, auc_high = metrics.get("roc_auc_interval") or (None, None)  # cards written before it had none
    auc_interval = f" [95% interval {auc_low:.3f}, {auc_high:.3f}]" if auc_low is not None else ""
    resumed = (f" (the PGD examples of {metrics['pgd_batches_resumed']} batches were made by an earlier run and "
               "kept in its run directory: their time is not included)" if metrics.get("pgd_batches_resumed") else "")
    return f"""# {title or name}

A detector stored by `dent train --export` (dent.training.detectors); use it as the defense
`{{kind: detector, checkpoint: {name}}}` around the model `{metrics['watched']}`, and only that model (the file
records its weights digest).

- Command: `{metrics['command']}`
- Fitted on {metrics['n_fit_pairs']} successful PGD pairs of {metrics['n_train_images']} training images
  (clean classified right, adversarial wrong); {metrics['date']}, wall time {metrics['wall_time_s']:.0f} s on
  {metrics['machine']}{resumed}.
- Threshold {metrics['threshold']:.6g}, set at {100 * metrics['fpr']:.1f}% false positives on {metrics['n_clean']}
  held-out clean training images.
- Held out ({metrics['n_clean']} clean, {metrics['n_adversarial']} successful PGD examples of the training
  attack): ROC AUC {metrics['roc_auc']:.3f}{auc_interval}; true-positive rate at the threshold {100 * metrics['tpr']:.1f}%
  [95% interval {100 * low:.1f}, {100 * high:.1f}]. These are detector-unaware examples: the attack that
  broke detectors (docs/defenses.md, Detection) is measured by the security tables.

{terms}
## Config

```yaml
{config.rstrip()}
```
"""
