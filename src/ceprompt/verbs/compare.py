"""``ceprompt compare RUN_OR_EVAL_DIR ...``: runs side by side, the settings they differ in, and whether the
differences are more than chance.

Each argument is a training run (its final ``eval/``), an evaluation folder (``ceprompt eval --out``) or a folder
holding runs (a ``demo --seeds N`` folder). Runs whose settings differ only in their seed form a group, reported
as mean ± standard deviation. Two evaluations of the same test images are compared pairwise: McNemar's test on
the items exactly one of them gets right, and a bootstrap 95% interval of the accuracy difference.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.config import dotted, read_yaml
from ..core.errors import ConfigError
from ..core.io_utils import FORMULA_STARTS
from ..core.schema import SchemaError, read_json
from ..engine.significance import bootstrap_difference, mcnemar, mean_std

# Settings that name places or this machine, not the model: never a difference worth listing.
NOT_SETTINGS = ("run.name", "run.output_dir", "run.threads", "run.progress", "run.seed", "backbone.init",
                "backbone.path", "data.root", "data.workers")


@dataclass
class Evaluated:
    name: str
    metrics: dict[str, Any]
    settings: dict[str, Any]
    right: dict[str, bool] = field(default_factory=dict)  # image path -> predicted correctly
    truth: dict[str, str] = field(default_factory=dict)


def _unquoted(cell: str) -> str:
    """A cell as written before the CSV's spreadsheet guard put a ``'`` before it."""
    return cell[1:] if cell.startswith("'") and cell[1:2] and cell[1] in "".join(FORMULA_STARTS) else cell


def _read_eval(folder: Path, name: str, config: dict[str, Any]) -> Evaluated:
    try:
        metrics = read_json((folder / "metrics.json").read_bytes(), str(folder / "metrics.json"))
    except (OSError, SchemaError) as exc:
        raise ConfigError(f"{folder}: no readable metrics.json ({exc})") from None
    result = Evaluated(name, metrics, dotted(config))
    predictions = folder / "predictions.csv"
    if predictions.is_file():
        with open(predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            for row in csv.DictReader(fh):
                path = _unquoted(row["path"])
                result.right[path] = _unquoted(row["true"]) == _unquoted(row["predicted"])
                result.truth[path] = _unquoted(row["true"])
    return result


def _checkpoint_config(metrics_file: Path) -> dict[str, Any]:
    """The training config recorded with the checkpoint an evaluation folder names, when it is still there."""
    try:
        metrics = read_json(metrics_file.read_bytes(), str(metrics_file))
        sidecar = Path(metrics.get("checkpoint", "")).with_suffix(".json")
        return read_json(sidecar.read_bytes(), str(sidecar)).get("config", {}) if sidecar.is_file() else {}
    except (OSError, SchemaError, AttributeError):
        return {}


def find_evaluations(path: str | Path) -> list[Evaluated]:
    """The evaluations a path stands for: a run, an evaluation folder, or every run under a folder."""
    folder = Path(path).expanduser()
    if (folder / "config.yaml").is_file() and (folder / "eval" / "metrics.json").is_file():
        config = read_yaml(folder / "config.yaml")
        return [_read_eval(folder / "eval", str(folder), config)]
    if (folder / "metrics.json").is_file():
        return [_read_eval(folder, str(folder), _checkpoint_config(folder / "metrics.json"))]
    runs = sorted(p.parent.parent for p in folder.glob("**/eval/metrics.json") if (p.parent.parent / "config.yaml")
                  .is_file()) if folder.is_dir() else []
    if not runs:
        raise ConfigError(f"{folder}: not a training run, an evaluation folder or a folder of runs (no "
                          "metrics.json found)")
    return [e for run in runs for e in find_evaluations(run)]


def _group_key(e: Evaluated) -> str:
    return json.dumps({k: v for k, v in e.settings.items() if k not in NOT_SETTINGS}, sort_keys=True, default=str)


def compare(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Everything ``ceprompt compare`` prints, as data."""
    evaluations = [e for p in paths for e in find_evaluations(p)]
    if not evaluations:
        raise ConfigError("nothing to compare")
    classes = list(evaluations[0].metrics.get("class_names", []))
    groups: dict[str, list[Evaluated]] = {}
    for e in evaluations:
        groups.setdefault(_group_key(e), []).append(e)
    rows = [_row(group) for group in groups.values()]
    keys = sorted({k for e in evaluations for k in e.settings} - set(NOT_SETTINGS))
    differing = [k for k in keys if len({json.dumps(e.settings.get(k), default=str) for e in evaluations}) > 1]
    settings = {k: [g[0].settings.get(k) for g in groups.values()] for k in differing}
    pairs = []
    comparable = [e for e in evaluations if e.right]
    for a, b in itertools.combinations(comparable, 2):
        if a.truth.keys() != b.truth.keys() or any(a.truth[p] != b.truth[p] for p in a.truth):
            continue  # not the same images
        order = sorted(a.right)
        ra, rb = [a.right[p] for p in order], [b.right[p] for p in order]
        pairs.append({"a": a.name, "b": b.name, "n": len(order), **mcnemar(ra, rb), **bootstrap_difference(ra, rb)})
    return {"classes": classes, "rows": rows, "settings": settings, "pairs": pairs,
            "groups": [[e.name for e in g] for g in groups.values()]}


def _row(group: list[Evaluated]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        return dict(zip(("mean", "std"), mean_std(values)))

    classes = group[0].metrics.get("class_names", [])
    name = group[0].name if len(group) == 1 else f"{group[0].name} (+{len(group) - 1} seeds)"
    return {
        "name": name, "runs": len(group), "n": group[0].metrics.get("n"),
        **{key: stat([e.metrics[key] for e in group]) for key in ("accuracy", "mean_class_accuracy", "macro_f1")},
        "f1": {c: stat([e.metrics["per_class"][c]["f1"] for e in group]) for c in classes},
    }


def _cell(value: dict[str, float], several: bool) -> str:
    return f"{value['mean']:.4f} ± {value['std']:.4f}" if several else f"{value['mean']:.4f}"


def markdown(result: dict[str, Any]) -> str:
    classes = result["classes"]
    lines = ["| run | images | accuracy | mean class accuracy | macro-F1 | " +
             " | ".join(f"F1 {c}" for c in classes) + " |", "|---" * (5 + len(classes)) + "|"]
    for row in result["rows"]:
        several = row["runs"] > 1
        lines.append(f"| {row['name']} | {row['n']} | {_cell(row['accuracy'], several)} | "
                     f"{_cell(row['mean_class_accuracy'], several)} | {_cell(row['macro_f1'], several)} | " +
                     " | ".join(_cell(row["f1"][c], several) for c in classes) + " |")
    if any(row["runs"] > 1 for row in result["rows"]):
        lines += ["", "Runs that differ only in their seed are one row: mean ± sample standard deviation."]
    if result["settings"]:
        lines += ["", "Settings that differ:", "", "| setting | " + " | ".join(r["name"] for r in result["rows"]) + " |",
                  "|---" * (1 + len(result["rows"])) + "|"]
        lines += [f"| `{k}` | " + " | ".join(str(v) for v in values) + " |" for k, values in result["settings"].items()]
    if result["pairs"]:
        lines += ["", "On the same test images (McNemar's exact test on the images exactly one gets right; 95% "
                  "bootstrap interval of the accuracy difference):", "",
                  "| A | B | accuracy A - B [95% CI] | A right, B wrong | A wrong, B right | McNemar p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | "
                  f"{p['b']} | {p['c']} | {p['p_value']:.4g} |" for p in result["pairs"]]
    return "\n".join(lines) + "\n"


def write_csv(result: dict[str, Any], path: Path) -> None:
    from ..core.io_utils import atomic_write, spreadsheet_safe

    classes = result["classes"]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "runs", "images", "accuracy", "accuracy_std", "mean_class_accuracy",
                         "mean_class_accuracy_std", "macro_f1", "macro_f1_std",
                         *[spreadsheet_safe(f"f1_{c}") for c in classes]])
        for row in result["rows"]:
            writer.writerow([spreadsheet_safe(row["name"]), row["runs"], row["n"],
                             *[row[k][s] for k in ("accuracy", "mean_class_accuracy", "macro_f1")
                               for s in ("mean", "std")],
                             *[row["f1"][c]["mean"] for c in classes]])


def plot_f1(result: dict[str, Any], path: Path) -> Path:
    """Per-class F1 of every row, side by side (error bars: the standard deviation over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, rows = result["classes"], result["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(classes) * max(1, len(rows)) ** 0.5), 4))
    x = np.arange(len(classes))
    short = [Path(row["name"]).name for row in rows]
    labels = short if len(set(short)) == len(short) else [row["name"] for row in rows]  # folder names when unique
    for i, (row, label) in enumerate(zip(rows, labels)):
        errors = [row["f1"][c]["std"] for c in classes] if row["runs"] > 1 else None
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [row["f1"][c]["mean"] for c in classes], width,
               yerr=errors, label=label, capsize=2)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class F1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
