"""The demo's report folder: results table, confusion matrix, training curves, example predictions."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from ..core.outputs import save_figure  # noqa: E402
from ..engine.plots import plot_curves  # noqa: E402
from ..engine.significance import mean_std  # noqa: E402


def representative_examples(rows: list[dict[str, str]], per_class: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Per class, ``per_class`` test faces, right and wrong in the proportion of that class's accuracy, drawn at
    random (seeded): a grid that shows the result, not the first files of the split."""
    rng = random.Random(seed)
    picked = []
    for name in dict.fromkeys(row["true"] for row in rows):
        group = [row for row in rows if row["true"] == name]
        right = [row for row in group if row["predicted"] == name]
        wrong = [row for row in group if row["predicted"] != name]
        k = min(per_class, len(group))
        n_wrong = min(len(wrong), k - min(len(right), round(k * len(right) / len(group))))
        picked.append(rng.sample(right, k - n_wrong) + rng.sample(wrong, n_wrong))
    return picked


def plot_examples(predictions_csv: Path, path: Path, per_class: int = 3, seed: int = 0) -> Path:
    """Test faces with true and predicted labels (green when right, red when wrong), a column per class, picked
    by :func:`representative_examples`; the title says how many are right, here and in the whole test split."""
    with open(predictions_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_class = representative_examples(rows, per_class, seed)
    fig, axes = plt.subplots(per_class, len(by_class), figsize=(1.9 * len(by_class), 2.2 * per_class + 0.7),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for column, examples in enumerate(by_class):
        for row, example in enumerate(examples):
            ax = axes[row][column]
            ax.imshow(Image.open(example["path"]).convert("RGB"))
            right = example["true"] == example["predicted"]
            ax.set_title(f"true {example['true']}\npred {example['predicted']}", fontsize=9,
                         color="darkgreen" if right else "firebrick")
    shown = [example for examples in by_class for example in examples]
    shown_right = sum(e["true"] == e["predicted"] for e in shown)
    all_right = sum(row["true"] == row["predicted"] for row in rows)
    fig.suptitle(f"{per_class} test faces per class, right and wrong in proportion to the class's accuracy: "
                 f"{shown_right} of {len(shown)} right here; {all_right} of {len(rows)} "
                 f"({all_right / max(len(rows), 1):.1%}) in the whole test split", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, 100)


def results_markdown(results: dict[str, Any]) -> str:
    """The demo's table (mean ± std when several seeds ran) and the time each step took."""
    several = len(results.get("seeds", [0])) > 1
    lines = ["| step | accuracy | macro-F1 |", "|---|---|---|"]
    lines += [f"| {r['step']} | {format_value(r, 'accuracy', several)} | {format_value(r, 'macro_f1', several)} |"
              for r in results["rows"]]
    lines += [f"| chance | {results['chance']:.3f} | |", ""]
    seeds = results.get("seeds", [])
    lines += [f"{results['n_train']} training and {results['n_test']} test images"
              + (f"; mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}" if several else "")
              + f"; {results.get('threads', '?')} CPU thread(s), {results.get('precision', 'fp32')}"
              + (f"; demo CLIP: {results['demo_clip']['which']} ({results['demo_clip']['pretraining_steps']} "
                 "pretraining steps)" if results.get("demo_clip") else "") + ".", "",
              "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def write_demo_report(folder: Path, results: dict[str, Any], run1: Path, run2: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(results_markdown(results))
    shutil.copy(run2 / "eval" / "confusion_matrix.png", folder / "confusion_matrix.png")
    plot_curves({"stage 1 (EVA)": run1 / "summary.csv", "stage 2 (CAT)": run2 / "summary.csv"},
                folder / "training_curves.png")
    plot_examples(run2 / "eval" / "predictions.csv", folder / "examples.png")
    return folder


def seed_row(step: str, values: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over seeds; std is 0 for a single value."""
    row: dict[str, Any] = {"step": step}
    for key in ("accuracy", "macro_f1"):
        row[key], row[f"{key}_std"] = mean_std([v[key] for v in values])
    return row


def format_value(row: dict[str, Any], key: str, several: bool) -> str:
    return f"{row[key]:.3f} ± {row[key + '_std']:.3f}" if several else f"{row[key]:.3f}"


def format_table(results: dict[str, Any]) -> str:
    several = len(results.get("seeds", [0])) > 1
    width = 15 if several else 9
    title = f"mean ± std over {len(results['seeds'])} seeds" if several else ""
    lines = [f"{title:24s} {'accuracy':>{width}s} {'macro-F1':>{width}s}"]
    for row in results["rows"]:
        lines.append(f"{row['step']:24s} {format_value(row, 'accuracy', several):>{width}s} "
                     f"{format_value(row, 'macro_f1', several):>{width}s}")
    lines.append(f"{'chance':24s} {results['chance']:{width}.3f}")
    return "\n".join(lines)
