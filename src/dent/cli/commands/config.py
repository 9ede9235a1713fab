"""``dent config show``: a command's resolved config, each key with where its value comes from."""

from __future__ import annotations

import argparse
import json

from dent.cli.command import COMMANDS, add_config_arguments, command
from dent.identity import flatten

#: The commands whose config ``--for`` can show.
CONFIGURED = ("evaluate", "train", "bench", "accuracy", "models", "serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="show: print the resolved config with each key's source")
    parser.add_argument("--for", dest="target", choices=CONFIGURED, default="evaluate",
                        help="the command whose config to resolve (default: evaluate)")
    add_config_arguments(parser)


@command("config", "print a command's resolved config with each key's source (default, file, override)",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    config_class = COMMANDS.get(args.target).config
    cfg, sources = config_class.key_sources(args.cfg, args.overrides)
    values = flatten(cfg.to_dict())
    shown = {key: json.dumps(value, default=str) for key, value in values.items()}
    width = max(len(f"{key}: {text}") for key, text in shown.items())
    for key, text in shown.items():
        print(f"{f'{key}: {text}':<{width}}  # {sources[key]}")
    return 0
