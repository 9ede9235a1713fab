"""Entry point of the ``dent`` console script."""

from __future__ import annotations

import argparse
import sys

# Importing the command modules registers their commands.
from dent.cli import commands  # noqa: F401
from dent.cli.command import COMMANDS
from dent.errors import DentError
from dent.provenance import version_text
from dent.runtime import tune_cpu_allocator


class VersionAction(argparse.Action):
    """``--version``, computed only when asked (it runs git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dent",
        description="Dynamic adversarial defense by test-time entropy minimization, and its evaluation.",
    )
    parser.add_argument("--version", action=VersionAction, nargs=0,
                        help="print dent's version and the git commit of its source, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(cmd_parser)
        cmd_parser.set_defaults(run=cmd.run)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``KEY VALUE`` overrides also after a flag (``evaluate --cfg F a 1 --dry-run b 2``):
    argparse collects a positional list only up to the first flag, so what follows is appended to it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [item for item in extra if item.startswith("-") and not _is_number(item)]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        tune_cpu_allocator()  # keep freed memory for reuse: fewer page faults on CPU (docs/performance.md)
        return args.run(args)
    except DentError as exc:
        print(f"dent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dent {args.command}: interrupted; finished results are kept in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
