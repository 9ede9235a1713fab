"""The command registry and the config plumbing shared by all commands."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dent.config import RunConfig, load_config
from dent.provenance import write_run_metadata
from dent.registry import Registry


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator registering ``run(args) -> exit code`` as a CLI command."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.register(name, Command(name, help, run, add_arguments or add_config_arguments))
        return run

    return register


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", metavar="FILE", help="YAML config file (see cfgs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY VALUE",
        help="config overrides as 'KEY VALUE' pairs or 'KEY=VALUE' (e.g. MODEL.ARCH Wong2020Fast data.n_images=500)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.cfg, args.overrides)


def prepare_run_dir(cfg: RunConfig, command_name: str) -> Path:
    """Create the run directory and save the resolved config and provenance in it."""
    run_dir = cfg.run_dir(command_name)
    write_run_metadata(run_dir, cfg.to_dict())
    return run_dir
