"""``dent report RUN_DIR...``: tables (markdown, CSV, JSON) and figures from one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from dent.cli.command import command
from dent.evaluation.report import write_report
from dent.evaluation.rundir import REPORT_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR",
        help="run directories written by `dent evaluate` (or their results.sqlite files); several are merged "
        "(shards of one config, or runs of different models)",
    )
    parser.add_argument("--out", metavar="DIR", help=f"where to write the report (default: RUN_DIR/{REPORT_DIR} of the first run)")


@command("report", "write the markdown/CSV/JSON tables and PNG plots of one or more evaluation runs", add_arguments)
def run(args: argparse.Namespace) -> int:
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / REPORT_DIR
    files = write_report(args.runs, out)
    print(files.text)
    print(f"report: {files.markdown}")
    for path in [files.csv, files.json, *files.figures]:
        print(f"        {path}")
    return 0
