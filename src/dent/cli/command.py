"""The command registry and the config plumbing shared by all commands."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from dent.outputs import RUN_DIR_HINT, output_dir
from dent.provenance import write_run_metadata
from dent.registry import Registry
from dent.sections import CommandConfig


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    config: Optional[type[CommandConfig]]  # the command's config class; None: it reads no config


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, *,
            config: Optional[type[CommandConfig]] = None):
    """Decorator registering ``run(args) -> exit code`` as a CLI command whose ``--cfg`` and overrides are
    resolved into ``config`` (see :func:`config_from_args`)."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.register(name, Command(name, help, run, add_arguments or add_config_arguments, config))
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


def add_dry_run_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help=f"print the resolved config, {what}, then exit without running or writing anything")


def print_dry_run(cfg: CommandConfig, plan: str) -> int:
    """``--dry-run``'s output: the resolved config, then the command's plan and estimate."""
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print()
    print(plan)
    return 0


def config_from_args(args: argparse.Namespace, file_defaults: dict[str, Any] | None = None) -> CommandConfig:
    """The config of the command being run, from ``--cfg`` (else ``file_defaults``) and the overrides."""
    return COMMANDS.get(args.command).config.load(args.cfg, args.overrides, file_defaults=file_defaults)


def prepare_run_dir(cfg: CommandConfig, command_name: str) -> Path:
    """Create the run directory and save the resolved config and provenance in it."""
    run_dir = output_dir(cfg.run_dir(command_name), "run directory", RUN_DIR_HINT)
    write_run_metadata(run_dir, cfg.to_dict())
    return run_dir
