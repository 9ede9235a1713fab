"""``dent models``: the model registry and which entries work offline."""

from __future__ import annotations

import argparse

from dent.cli.command import command, config_from_args
from dent.models import list_models
from dent.sections import ModelDataConfig


@command("models", "list architectures and named models, and which are available offline", config=ModelDataConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rows = list_models(model_dir=cfg.model.model_dir)
    width = max(len(info.name) for info in rows)
    print(f"{'name':<{width}}  {'kind':<12} {'threat':<6} {'offline':<8} description")
    for info in rows:
        offline = "yes" if info.offline_available else "no"
        print(f"{info.name:<{width}}  {info.kind:<12} {info.threat_model or '-':<6} {offline:<8} {info.description}")
    return 0
