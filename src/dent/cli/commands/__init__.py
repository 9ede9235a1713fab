"""One module per CLI command; importing this package registers them all."""

from dent.cli.commands import accuracy, bench, config, evaluate, models, report, serve, serve_load, train  # noqa: F401
