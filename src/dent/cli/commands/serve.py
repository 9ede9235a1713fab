"""``dent serve``: a model and defense behind an HTTP service with dynamic batching (docs/serving.md)."""

from __future__ import annotations

import argparse
import sys

from dent.cli.command import command, config_from_args
from dent.errors import DentError
from dent.serving.config import ServeConfig

#: The packages of the ``serve`` extra, by import name.
SERVE_PACKAGES = ("fastapi", "starlette", "uvicorn", "multipart", "prometheus_client")


@command("serve", "answer a model and defense's predictions over HTTP, batched, under an isolation policy",
         config=ServeConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        from dent.serving.server import run_server
    except ImportError as exc:
        if exc.name not in SERVE_PACKAGES:
            raise
        raise DentError(f"dent serve needs the serve extra (missing module {exc.name!r}): "
                        "pip install -e '.[serve]'") from None
    try:
        run_server(cfg)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on, after its graceful shutdown
        print("dent serve: stopped", file=sys.stderr)
        return 130
    return 0
