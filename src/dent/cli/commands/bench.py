"""``dent bench``: time the static model, dent's configurations and a naive reference, side by side."""

from __future__ import annotations

import argparse
import json

from dent.benchmark.config import BenchConfig
from dent.benchmark.runner import Bench, format_table
from dent.cli.command import add_config_arguments, add_dry_run_argument, command, config_from_args, \
    prepare_run_dir, print_dry_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_dry_run_argument(parser, "the timings it would take and an estimate of their cost")


@command("bench", "time dent against the static model, its (2K+1)-forward floor and a naive reference",
         add_arguments, config=BenchConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        from dent.benchmark.dryrun import dry_run

        return print_dry_run(cfg, dry_run(cfg))
    run_dir = prepare_run_dir(cfg, "bench")
    result = Bench(cfg).run()
    table = format_table(result)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (run_dir / "bench.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nresults: {run_dir}/bench.json, {run_dir}/bench.md")
    return 0
