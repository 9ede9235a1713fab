"""Export a finished training run as a reference checkpoint for the model zoo (fp16 safetensors + model card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dent.errors import DentError
from dent.outputs import output_dir
from dent.training.curves import CURVES_FILE
from dent.training.trainer import CHECKPOINT_FILE, load_checkpoint


class ExportError(DentError):
    """A run cannot be exported (unfinished, or missing its checkpoint)."""


def export_reference_checkpoint(
    run_dir: str | Path, name: str, *, directory: str | Path | None = None, allow_unfinished: bool = False
) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` (fp16 weights, architecture in the metadata) and ``<name>.md`` (model card).

    ``directory`` defaults to a user directory (:func:`export_directory`); ``"package"`` is the reference slot
    ``src/dent/models/checkpoints/``, where the model is registered in :mod:`dent.models.reference` with the
    ``register_reference`` line printed in the card.
    """
    from dent.models import build_model, save_reference
    from dent.models.reference import CHECKPOINT_DIR

    run_dir = Path(run_dir)
    ckpt = finished_run(run_dir, name, allow_unfinished)
    out_dir, in_package = export_directory(directory, CHECKPOINT_DIR)
    arch = ckpt["arch"]
    model = build_model(arch)
    model.load_state_dict(ckpt["model"])
    final = _final_accuracy(ckpt["history"])
    train_cfg = ckpt["config"]["train"]
    weights = save_reference(
        model, name, arch, directory=out_dir,
        metadata={
            "dent.recipe": ckpt["recipe"],
            "dent.epochs": str(ckpt["epoch"]),
            "dent.train_config_hash": ckpt["config_hash"],
            "dent.heldout_clean_acc": json.dumps(final.get("clean_acc")),
            "dent.heldout_pgd_acc": json.dumps(final.get("robust_acc")),
        },
    )
    card = out_dir / f"{name}.md"
    card.write_text(model_card(name, ckpt, run_dir, threat_model(train_cfg, ckpt["recipe"]),
                               None if in_package else weights), encoding="utf-8")
    return weights, card


def finished_run(run_dir: Path, name: str, allow_unfinished: bool = False) -> dict[str, Any]:
    """The checkpoint of the finished training run ``run_dir``, to export under ``name``."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ExportError(f"cannot export {str(run_dir)!r}: it holds no {CHECKPOINT_FILE} (expected a dent train run directory)")
    ckpt = load_checkpoint(path)
    if ckpt["status"] == "running" and not allow_unfinished:
        raise ExportError(
            f"cannot export {str(run_dir)!r}: training stopped at epoch {ckpt['epoch']} of {ckpt['epochs']}; "
            "finish it with `dent train ... --resume` first (or pass allow_unfinished)"
        )
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ExportError(f"reference name {name!r}: expected letters, digits, '_', '-' or '.'")
    return ckpt


#: ``--export-dir package``: write into the installed package's slot (for the project's developers).
PACKAGE = "package"


def export_directory(directory: str | Path | None, package_slot: Path) -> tuple[Path, bool]:
    """Where an export goes, and whether that is the package: a user directory by default (``exported/`` in the
    model directory, ``$DENT_MODEL_DIR`` or ``./models``), the package's ``package_slot`` only when asked."""
    from dent.models.zoo import resolve_model_dir

    if directory is None:
        path = resolve_model_dir() / "exported"
    else:
        path = package_slot if str(directory) == PACKAGE else Path(directory)
    return output_dir(path, "export directory", "choose another one (--export-dir DIR); the trained run is kept"), \
        path == package_slot


def license_lines(what: str) -> list[str]:
    """The card's license, data and limitations."""
    return [
        "## License, data and limitations",
        "",
        f"- License: MIT, as dent (the {what} and this card). Data: CIFAR-10 (Krizhevsky 2009; the training split "
        "only, the test split for the figures above), distributed for research by its authors.",
        "- Limitations: trained for a few epochs on a CPU, far from the accuracy of GPU-trained models; every figure "
        "here is from the data and attack stated, not a guarantee of robustness (evaluate it with the attacks "
        "that fit your threat model: docs/evaluation.md, docs/adaptive_attacks.md).",
        "",
    ]


#: The test images a density model's card measures its bits per dimension on (all of CIFAR-10's).
CARD_TEST_IMAGES = 10000


def export_density_model(
    run_dir: str | Path, name: str, *, directory: str | Path | None = None, test_images: int | None = None,
) -> tuple[Path, Path]:
    """Write a finished density-model run (recipe ``pixelcnn``) as ``<name>.safetensors`` (fp16) and its card
    ``<name>.md``, with its bits per dimension on ``test_images`` images of the test split (measured here, on the
    fp16 weights it is stored with)."""
    from dent.data import load_split
    from dent.defenses.purification import PURIFIER_DIR, load_density_model, save_density_model
    from dent.training.recipes import RECIPES, heldout_bits_per_dim
    from dent.training.config import TrainSection

    run_dir = Path(run_dir)
    ckpt = finished_run(run_dir, name)
    out_dir, in_package = export_directory(directory, PURIFIER_DIR)
    models = RECIPES.get(ckpt["recipe"]).models
    if models is None:
        raise ExportError(f"{str(run_dir)!r} trained a classifier (recipe {ckpt['recipe']}), not a density model")
    model = models.get(ckpt["arch"])()
    model.load_state_dict(ckpt["model"])
    weights = save_density_model(model, ckpt["arch"], out_dir / f"{name}.safetensors", {
        "dent.recipe": ckpt["recipe"], "dent.epochs": str(ckpt["epoch"]),
        "dent.train_config_hash": ckpt["config_hash"],
    })
    data = ckpt["config"]["data"]
    test = load_split(data["dataset"], "test", data_dir=data.get("dir"))
    n = min(test_images or CARD_TEST_IMAGES, len(test))
    cfg = TrainSection.model_validate(ckpt["config"]["train"])
    stored = load_density_model(str(weights))
    test_bpd = heldout_bits_per_dim(stored, test.images[:n], cfg)["heldout_bits_per_dim"]
    card = out_dir / f"{name}.md"
    card.write_text(density_card(name if in_package else str(weights), ckpt, run_dir, model, test_bpd, n,
                                 title=name), encoding="utf-8")
    return weights, card


def density_card(name: str, ckpt: dict[str, Any], run_dir: Path, model: Any, test_bpd: float, n_test: int,
                 title: str | None = None) -> str:
    """The card of an exported density model; ``name``: how the ``pixeldefend`` kind finds it (its stored name,
    or its file's path outside the package)."""
    cfg, t = ckpt["config"], ckpt["config"]["train"]
    last = ckpt["history"][-1]
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"# {title or name}",
        "",
        f"{ckpt['arch']} density model ({params} parameters) trained with the dent `{ckpt['recipe']}` recipe on "
        f"{cfg['data']['dataset']} for {ckpt['epoch']} epochs: {test_bpd:.3f} bits per dimension on {n_test} test "
        "images (a uniform model: 8).",
        "",
        "## Training",
        "",
        f"- epochs: {ckpt['epoch']}; batch size {t['batch_size']}; {_optimizer_text(t)}, "
        f"weight decay {t['weight_decay']:g}, {t['schedule']} schedule; seed {cfg['seed']}",
        f"- data: {cfg['data']['dataset']} train split minus {t['holdout']} held-out images (seed {t['holdout_seed']})"
        + (f", {t['n_images']} training images" if t["n_images"] else ""),
        f"- wall time: {ckpt['wall_time_s']:.0f} s ({ckpt['wall_time_s'] / 3600:.2f} h)",
        f"- training config hash: `{ckpt['config_hash']}`",
        "",
        *_provenance_lines(ckpt),
        "## Likelihood",
        "",
        f"Test split, first {n_test} images, fp16 weights as stored: {test_bpd:.4f} bits/dim. Last epoch: training "
        f"{last['train_loss']:.4f}, held-out {last.get('heldout_bits_per_dim', float('nan')):.4f} bits/dim.",
        "",
        "| epoch | train bits/dim | held-out bits/dim |",
        "|---:|---:|---:|",
        *[f"| {e['epoch']} | {e['train_loss']:.4f} | {e.get('heldout_bits_per_dim', float('nan')):.4f} |"
          for e in ckpt["history"]],
        "",
        "## Limitations",
        "",
        "A small model trained briefly on a CPU, and the three channels of a pixel are modelled as independent given "
        "the pixels before it (one forward pass per pixel when purifying, instead of three): its likelihood is far "
        "from the literature's (PixelCNN 3.14 and PixelCNN++ 2.92 bits/dim on the CIFAR-10 test set; van den Oord "
        "et al. 2016, Salimans et al. 2017), so PixelDefend with it purifies towards a coarser density than Song "
        "et al.'s. Trained on CIFAR-10's training split only; for research on adversarial purification.",
        "",
        *license_lines("density model"),
        "## Use",
        "",
        "As PixelDefend's density model: `defenses: {pixeldefend: {kind: pixeldefend, density_model: "
        f"{name}}}}}` (docs/defenses.md).",
        "",
        *_config_lines(cfg),
    ]
    return "\n".join(lines)


def threat_model(train_cfg: dict[str, Any], recipe: str) -> str | None:
    """The threat model an adversarial recipe trained against; None for the others (nominal, distillation, ...)."""
    from dent.training.recipes import RECIPES

    return train_cfg["attack"]["norm"] if RECIPES.get(recipe).adversarial else None


def _final_accuracy(history: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [e for e in history if e.get("clean_acc") is not None]
    return evaluated[-1] if evaluated else {}


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _eps_text(norm: str, eps: float) -> str:
    from dent.attacks.config import format_eps

    return f"{norm} eps={format_eps(eps, norm)}"


def _provenance_lines(ckpt: dict[str, Any]) -> list[str]:
    """The card's commands and hardware, from the run's invocations."""
    invocations = ckpt.get("invocations", [])
    commands = [i["command"] for i in invocations if i.get("command")] or ["(trained through the Python API)"]
    machines = {json.dumps(i.get("machine", {}), sort_keys=True): i for i in invocations}
    hardware = [
        f"- {i.get('device', '?')}: {m.get('processor', '?')}, {m.get('cpu_threads', '?')} threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f" ({m.get('platform', '?')})"
        for i in machines.values() for m in [i.get("machine", {})]
    ] or ["- unknown"]
    return ["Command(s):", "", "```", *commands, "```", "", "Hardware:", "", *hardware, ""]


def _optimizer_text(t: dict[str, Any]) -> str:
    """The optimizer of a stored training config (configs stored before ``train.optimizer`` existed: SGD)."""
    if t.get("optimizer", "sgd") == "adam":
        return f"Adam lr {t['lr']:g}"
    return f"SGD lr {t['lr']:g}, momentum {t['momentum']:g}"


def _config_lines(cfg: dict[str, Any]) -> list[str]:
    return ["## Full training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]


def model_card(name: str, ckpt: dict[str, Any], run_dir: Path, threat: str | None,
               weights: Path | None = None) -> str:
    """The card of an exported model; ``weights``: its file outside the package (None: in the package slot)."""
    cfg = ckpt["config"]
    t = cfg["train"]
    recipe, arch, epochs = ckpt["recipe"], ckpt["arch"], ckpt["epoch"]
    final = _final_accuracy(ckpt["history"])
    eval_norm = t["eval"]["norm"] or t["attack"]["norm"]
    eval_eps = t["eval"]["eps"] if t["eval"]["eps"] is not None else t["attack"]["eps"]
    attack = "" if threat is None else f" against {_eps_text(t['attack']['norm'], t['attack']['eps'])}"
    stopped = " (stopped early on catastrophic overfitting)" if ckpt["status"] == "early_stopped" else ""
    hours = ckpt["wall_time_s"] / 3600
    kwargs = "" if threat is None else f', threat_model="{threat}"'
    lines = [
        f"# {name}",
        "",
        f"{arch} trained with the dent `{recipe}` recipe{attack} on {cfg['data']['dataset']} for {epochs} epochs{stopped}; "
        f"held-out clean {_pct(final.get('clean_acc'))}, PGD-{t['eval']['steps']} {_pct(final.get('robust_acc'))}.",
        "",
        "## Training",
        "",
        f"- recipe: `{recipe}`; architecture: `{arch}`; seed {cfg['seed']}",
        f"- epochs: {epochs} of {ckpt['epochs']} planned{stopped}; batch size {t['batch_size']}; {_optimizer_text(t)}, "
        f"weight decay {t['weight_decay']:g}, {t['schedule']} schedule",
        f"- data: {cfg['data']['dataset']} train split minus {t['holdout']} held-out images "
        f"(seed {t['holdout_seed']})" + (f", {t['n_images']} training images" if t["n_images"] else "")
        + (", random crop + flip" if t["augment"] else ""),
        f"- wall time: {ckpt['wall_time_s']:.0f} s ({hours:.2f} h)",
        f"- training config hash: `{ckpt['config_hash']}`",
        *[f"- fixed module `{key}` (e.g. the distillation teacher): {ident['module']}, weights digest `{ident['digest']}`"
          for key, ident in ckpt.get("frozen", {}).items()],
        "",
        *_provenance_lines(ckpt),
        "## Accuracy on the held-out split",
        "",
        f"Measured on the {t['holdout']} images held out from the *training* split (not the test set) after the "
        f"last epoch: clean {_pct(final.get('clean_acc'))}, PGD {_pct(final.get('robust_acc'))} "
        f"(PGD-{t['eval']['steps']}, {_eps_text(eval_norm, eval_eps)}, one random start). "
        "Evaluate on the test set with the `dent` evaluation commands.",
        "",
        "| epoch | train loss | clean | PGD |",
        "|---:|---:|---:|---:|",
        *[
            f"| {e['epoch']} | {e['train_loss']:.4f} | {_pct(e.get('clean_acc'))} | {_pct(e.get('robust_acc'))} |"
            for e in ckpt["history"]
        ],
        "",
        f"Training curves: `{run_dir / CURVES_FILE}`; log and history in `{run_dir}`.",
        "",
        *license_lines("model"),
        "## Use",
        "",
        *(["Register it in `src/dent/models/reference.py`:", "", "```python",
           f'register_reference("{name}", "{arch}"{kwargs})', "```"] if weights is None else
          [f"`dent.load_model(\"{arch}\", checkpoint=\"{weights}\")`, or on the command line "
           f"`model.arch {arch} model.checkpoint {weights}`."]),
        "",
        *_config_lines(cfg),
    ]
    return "\n".join(lines)
