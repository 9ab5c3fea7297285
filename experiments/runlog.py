"""Metrics of a run: CSV, TensorBoard event files (tensorboardX, no TensorFlow) and a PNG of the
loss curves."""

from __future__ import annotations

import csv
import os
import time

import matplotlib
from absl import flags, logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


def quiet_library_logs() -> None:
    """Let a run show its own progress and results: absl's INFO lines (JAX's backend probing,
    TFDS's dataset messages) are hidden unless `--verbosity` / `-v` is given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


class RunLog:
    """`log(step, name=value, ...)` appends to `metrics.csv` and the event file in `directory`;
    `close()` writes `curves.png` (one panel per metric). The CSV is rewritten as the run goes (at
    most once every `flush_s` seconds, atomically) and at `close`, so a killed run keeps its
    metrics up to its last seconds. `enabled=False` (every process but the writer of a
    multi-process run) creates and writes nothing."""

    def __init__(self, directory: str, flush_s: float = 1.0, enabled: bool = True):
        self.enabled = enabled
        self.directory = directory
        self.rows: list[dict] = []
        self.flush_s = flush_s
        self._flushed = 0.0
        if enabled:
            os.makedirs(directory, exist_ok=True)
            self.writer = SummaryWriter(os.path.join(directory, "tb"))

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), int(step))
        if time.monotonic() - self._flushed >= self.flush_s:
            self.write_csv()

    def write_csv(self) -> None:
        names = sorted({k for r in self.rows for k in r} - {"step"})
        path = os.path.join(self.directory, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=["step", *names])
            out.writeheader()
            out.writerows(self.rows)
        os.replace(path + ".tmp", path)
        self.writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.write_csv()
        self.writer.close()
        names = sorted({k for r in self.rows for k in r} - {"step"})
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3), squeeze=False)
        for ax, name in zip(axes[0], names):
            points = [(r["step"], r[name]) for r in self.rows if name in r]
            ax.plot(*zip(*points), marker="." if len(points) < 20 else None)
            ax.set_title(name)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(self.directory, "curves.png"), dpi=80)
        plt.close(fig)
