"""The loss curve of a run (log.csv -> PNG): per-row loss, its moving average, and the learning rate."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a run's log.csv as float arrays."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no logged iterations yet")
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def has_rows(path: str | Path) -> bool:
    """Whether a log.csv exists and holds at least one logged iteration (a checkpoint can come before the first
    row when --checkpoint-interval is smaller than --log-interval)."""
    try:
        with open(path, newline="") as f:
            return next(csv.DictReader(f), None) is not None
    except FileNotFoundError:
        return False


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot_loss(log_csv: str | Path, out_png: str | Path, title: str | None = None, window: int = 20) -> Path:
    """Write the loss / lr figure of a run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(log_csv)
    it = log["iter"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(it, log["loss"], color="tab:blue", alpha=0.3, lw=1, label="loss (decode + 0.4 aux)")
    ax.plot(it, moving_average(log["loss"], window), color="tab:blue", lw=2, label=f"moving average ({window})")
    if "decode_loss" in log:
        ax.plot(it, moving_average(log["decode_loss"], window), color="tab:green", lw=1.5, ls="--",
                label="decode-head NFL (avg)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(it, log["lr"], color="tab:orange", lw=1, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + lr_ax.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(title or f"training loss: {Path(log_csv).parent.name}")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
