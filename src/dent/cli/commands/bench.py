"""``dent bench``: time the static model, dent's configurations and a naive reference, side by side."""

from __future__ import annotations

import argparse
import json

from dent.benchmark.config import BenchConfig
from dent.benchmark.runner import Bench, format_table
from dent.cli.command import command, config_from_args, prepare_run_dir


@command("bench", "time dent against the static model, its (2K+1)-forward floor and a naive reference",
         config=BenchConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_dir = prepare_run_dir(cfg, "bench")
    result = Bench(cfg).run()
    table = format_table(result)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (run_dir / "bench.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nresults: {run_dir}/bench.json, {run_dir}/bench.md")
    return 0
