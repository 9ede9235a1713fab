"""``dent train``: train a model with a recipe, or fit a detector around a trained one; resumable."""

from __future__ import annotations

import argparse
import shlex

from dent.cli.command import add_config_arguments, add_dry_run_argument, command, config_from_args, print_dry_run
from dent.training.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the run directory's checkpoint (same as train.resume true); with no checkpoint yet, start",
    )
    parser.add_argument(
        "--resume-from", metavar="RUN_DIR_OR_CHECKPOINT", default=None,
        help="continue from this checkpoint (of the same training config), writing into this run's directory",
    )
    parser.add_argument(
        "--until-epoch", type=int, default=None, metavar="N",
        help="stop after epoch N (of train.epochs); continue later with --resume",
    )
    add_dry_run_argument(parser, "the epochs it would train and a time estimate (one timed step)")
    parser.add_argument(
        "--export", metavar="NAME", default=None,
        help="when training has finished, export the model as reference checkpoint NAME (fp16 safetensors + card)",
    )
    parser.add_argument(
        "--export-dir", metavar="DIR", default=None,
        help="where --export writes (default: exported/ in the model directory, $DENT_MODEL_DIR or ./models); "
             "'package': into dent's package, for its developers (src/dent/models/checkpoints/, for a detector "
             "src/dent/defenses/detection/checkpoints/, for a density model src/dent/defenses/purification/checkpoints/)",
    )


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (rebuilt from the parsed arguments), for the checkpoint and the model card."""
    words = ["dent", "train"] + (["--cfg", args.cfg] if args.cfg else []) + list(args.overrides)
    if args.resume:
        words.append("--resume")
    if args.resume_from:
        words += ["--resume-from", args.resume_from]
    if args.until_epoch is not None:
        words += ["--until-epoch", str(args.until_epoch)]
    if args.export:
        words += ["--export", args.export] + (["--export-dir", args.export_dir] if args.export_dir else [])
    return shlex.join(words)


#: ``dent train``'s one-line help; tests/test_training_cli.py checks it names every recipe of the registry.
DESCRIPTION = ("train a model with a recipe (nominal, pgd, trades, fgsm_rs, alp, dynat, temperature, distillation, "
               "gradient_penalty, pixelcnn; resumable) or fit a detector around a trained one (kde_detector, subnetwork_detector)")


@command("train", DESCRIPTION, add_arguments, config=TrainConfig)
def run(args: argparse.Namespace) -> int:
    from dent.training.recipes import RECIPES

    cfg = config_from_args(args)
    if args.dry_run:
        from dent.training.distributed import single_process_only
        from dent.training.dryrun import dry_run

        single_process_only("dent train --dry-run (an estimate from one timed step of one process)")

        return print_dry_run(cfg, dry_run(cfg))
    if RECIPES.get(cfg.train.recipe).detector is not None:
        return run_detector(cfg, args)
    return run_model(cfg, args)


def run_detector(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from dent.training.detectors import export_detector, fit_detector

    result = fit_detector(cfg, command=command_line(args))
    m = result.metrics
    print(f"{cfg.train.recipe} around {cfg.model.arch}: threshold {m['threshold']:.6g} at {100 * m['fpr']:.1f}% FPR "
          f"on {m['n_clean']} held-out clean images; held-out ROC AUC {m['roc_auc']:.3f}, TPR {100 * m['tpr']:.1f}% "
          f"on {m['n_adversarial']} successful PGD examples")
    print(f"results: {result.run_dir} (detector.safetensors, metrics.json, the PGD examples)")
    if args.export:
        weights, card = export_detector(result.run_dir, args.export, directory=args.export_dir)
        print(f"exported: {weights} and {card}")
    return 0


def run_model(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from dent.training.distributed import world_from_env
    from dent.training.export import export_density_model, export_reference_checkpoint
    from dent.training.recipes import RECIPES
    from dent.training.trainer import train

    result = train(cfg, until_epoch=args.until_epoch, resume=args.resume_from or args.resume, command=command_line(args))
    if not world_from_env().is_main:  # under torchrun, rank 0 reports and exports
        return 0
    last = next((e for e in reversed(result.history) if e.get("clean_acc") is not None), None)
    summary = f"{result.status} at epoch {result.epoch}/{cfg.train.epochs}"
    if result.history and result.history[-1].get("heldout_bits_per_dim") is not None:
        summary += f"; held-out {result.history[-1]['heldout_bits_per_dim']:.3f} bits/dim"
    if last is not None:
        summary += (f"; held-out clean {100 * last['clean_acc']:.2f}%, PGD {100 * last['robust_acc']:.2f}% "
                    f"(epoch {last['epoch']})")
    print(f"{cfg.train.recipe} training of {cfg.model.arch}: {summary}")
    print(f"results: {result.run_dir} (checkpoint.pt, history.json, curves.png, train.log)")
    if args.export:
        if result.status == "running":
            print(f"not exported: training is not finished (resume with --resume, then --export {args.export})")
        else:
            export = export_density_model if RECIPES.get(cfg.train.recipe).models else export_reference_checkpoint
            weights, card = export(result.run_dir, args.export, directory=args.export_dir)
            print(f"exported: {weights} and {card}")
    return 0
