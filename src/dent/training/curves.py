"""The training log: a JSON history of per-epoch loss and held-out accuracy, and a PNG of its curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dent.outputs import writing

HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "training log file"):
        tmp.write_text(text)
        os.replace(tmp, path)


def write_history(run_dir: Path, history: dict[str, Any]) -> Path:
    path = run_dir / HISTORY_FILE
    atomic_write_text(path, json.dumps(history, indent=2, allow_nan=True))
    return path


def read_history(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / HISTORY_FILE).read_text())


def plot_curves(run_dir: Path, history: dict[str, Any]) -> Path | None:
    """Training loss (left) and held-out clean / PGD accuracy (right) per epoch; ``None`` before any epoch."""
    epochs = history.get("epochs", [])
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [e["epoch"] for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(xs, [e["train_loss"] for e in epochs], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{history.get('recipe', '')} training loss")
    ax_loss.grid(alpha=0.3)
    evaluated = [e for e in epochs if _finite(e.get("clean_acc"))]
    if evaluated:
        ex = [e["epoch"] for e in evaluated]
        ax_acc.plot(ex, [100 * e["clean_acc"] for e in evaluated], marker="o", label="clean")
        ax_acc.plot(ex, [100 * e["robust_acc"] for e in evaluated], marker="s", label=history.get("robust_label", "PGD"))
        ax_acc.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run_dir / CURVES_FILE
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
