"""One module per CLI command; importing this package registers them all."""

from dent.cli.commands import accuracy, models  # noqa: F401
