"""Run several methods on one task and tabulate them (issue: experiments on real tasks).

    python -m experiments.compare --methods=lora,dora,pissa --steps=100 [any experiments.finetune flag]

For each method it runs `experiments.finetune` (same model, task, steps and seed) and writes
`compare.csv`, `compare.md` and `compare.png` to --compare_dir: trainable parameters, median step
time, step peak bytes (XLA `memory_analysis`), the task metric before/after and the Shakespeare
perplexity before/after (forgetting).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import finetune  # noqa: E402  (defines the finetune flags)
from experiments.benchlib import write_table  # noqa: E402

flags.DEFINE_list("methods", ["lora", "dora", "pissa"], "registry names to compare")
flags.DEFINE_string("compare_dir", "runs/compare", "where the table and plot go")
FLAGS = flags.FLAGS


def compare(methods: list[str]) -> list[dict]:
    rows = []
    for name in methods:
        FLAGS.method = name  # type: ignore[assignment]  # absl types FlagValues.__setattr__ with an unbound TypeVar
        FLAGS.out_dir = os.path.join(FLAGS.compare_dir, name)  # type: ignore[assignment]  # (the same)
        out = finetune.train()
        row = {"method": name, "trainable": out["trainable"], "step_s": out["step_s"], "peak_mb": out["peak_mb"]}
        for when in ("before", "after"):
            for metric, value in out[when].items():
                row[f"{metric}_{when}"] = value
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    metrics = sorted({k.rsplit("_", 1)[0] for r in rows for k in r if k.endswith("_after")})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names = [r["method"] for r in rows]
        ax.bar([i - 0.2 for i in range(len(rows))], [r[f"{metric}_before"] for r in rows], 0.4, label="before")
        ax.bar([i + 0.2 for i in range(len(rows))], [r[f"{metric}_after"] for r in rows], 0.4, label="after")
        ax.set_xticks(range(len(rows)), names)
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    del argv
    rows = compare(FLAGS.methods)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(write_table(rows, cols, os.path.join(FLAGS.compare_dir, "compare")))
    plot(rows, os.path.join(FLAGS.compare_dir, "compare.png"))


if __name__ == "__main__":
    app.run(main)
