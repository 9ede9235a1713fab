"""``dent evaluate``: clean and robust accuracy of defenses under attack, resumable, with a report."""

from __future__ import annotations

import argparse

from dent.cli.command import add_dry_run_argument, command, config_from_args, print_dry_run
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.mainjob import main_job
from dent.evaluation.api import benchmark_config
from dent.evaluation.report import write_report
from dent.evaluation.rundir import REPORT_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg", metavar="FILE",
        help="YAML experiment config (see cfgs/); without it, the main job (cfgs/main.yaml) runs",
    )
    add_dry_run_argument(parser, "the units it would run and a cost estimate (one timed call of each defense)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY VALUE",
        help="config overrides, e.g. data.n_images 500 attack.version standard evaluation.shard 1/4",
    )


@command(
    "evaluate",
    "clean and robust accuracy of defenses under AutoAttack or PGD; resumable, sharded, with a report",
    add_arguments,
    config=EvaluateConfig,
)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, file_defaults=None if args.cfg else main_job())
    if args.dry_run:
        from dent.evaluation.dryrun import dry_run

        return print_dry_run(cfg, dry_run(cfg).text())
    results = benchmark_config(cfg)
    done = results.run
    print(f"{done.n_run} unit(s) run, {done.n_skipped} resumed from the store, {done.seconds:.0f} s")
    if cfg.evaluation.report:
        files = write_report([done.run_dir], done.run_dir / REPORT_DIR, summary=results.summary)
        print()
        print(results)
        print()
        print(f"report: {files.markdown} (+ {', '.join(p.name for p in [files.csv, files.json, *files.figures])})")
    print(f"results: {done.run_dir}")
    return 0
