"""Optional experiment tracking: a run's config and metrics to TensorBoard (``output.tracking tensorboard``).

The run directory stays the record (config.yaml, history.json, the SQLite store); tracking mirrors it into
``RUN_DIR/tensorboard/`` for TensorBoard's dashboards (``tensorboard --logdir runs``). Needs the optional
``tensorboard`` package (``pip install -e ".[tracking]"``).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from dent.errors import ConfigError

#: The tracker's folder inside a run directory.
TRACKING_DIR = "tensorboard"


class Tracking(str, Enum):
    NONE = "none"
    TENSORBOARD = "tensorboard"


class Tracker:
    """Does nothing: ``output.tracking none``."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("output.tracking tensorboard needs the tensorboard package: "
                              "pip install -e \".[tracking]\" (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TRACKING_DIR))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log_scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(tracking: Tracking, run_dir: Path) -> Tracker:
    return TensorBoardTracker(run_dir) if tracking is Tracking.TENSORBOARD else Tracker()
