"""PNG figures: confusion matrix and training curves (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.outputs import save_figure  # noqa: E402


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts; rows are true classes."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.0 * n + 2))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=40, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{frac[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, 110)


def plot_curves(summary_csvs: dict[str, Path], path: Path) -> Path:
    """Loss and accuracy per epoch for one or more runs' summary.csv files (accuracy on the split each run
    selected its best epoch on: test, or validation with data.val_fraction)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    splits = set()
    for label, csv_path in summary_csvs.items():
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            split = "val" if "val_accuracy" in (reader.fieldnames or ()) else "test"
            rows = list(reader)
        splits.add(split)
        epochs = [int(r["epoch"]) for r in rows]
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label=label)
        scored = [(int(r["epoch"]), float(r[f"{split}_accuracy"])) for r in rows if r.get(f"{split}_accuracy")]
        if scored:
            ax_acc.plot(*zip(*scored), marker="o", label=label if len(summary_csvs) == 1 else f"{label} ({split})")
    named = " / ".join(sorted({"val": "validation", "test": "test"}[s] for s in splits))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{named} accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, 110)
