"""The run's log file: our messages and pyautoattack's (logger ``auto-attack``), beside the results."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dent.outputs import output_dir, writing

LOGGER_NAMES = ("dent", "auto-attack")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@contextmanager
def run_logging(log_path: Path) -> Iterator[logging.Logger]:
    """Append everything ``dent.*`` and ``auto-attack`` log (DEBUG and up) to ``log_path`` while inside.

    pyautoattack's messages go only to the file (not to the terminal, where its per-batch warnings would
    interleave with the progress bars); the runner prints a summary of them instead.
    """
    output_dir(log_path.parent, "directory of the run log")
    with writing(log_path, "run log"):
        handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    saved = []
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        if name == "auto-attack":
            logger.propagate = False
    try:
        yield logging.getLogger("dent.evaluation")
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()
