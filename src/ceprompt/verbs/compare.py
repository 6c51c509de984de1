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
import yaml

from ..core.config import dotted, read_yaml
from ..core.errors import ConfigError
from ..core.io_utils import FORMULA_STARTS
from ..core.outputs import save_figure
from ..core.schema import SchemaError, expect, read_json
from ..engine.significance import bootstrap_difference, mcnemar, mean_std
from ..model.stages import STAGES

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


MAX_CELL = 4096  # characters in one predictions.csv cell (a path, a class name)
MAX_ROWS = 10_000_000  # predictions.csv rows


def _metrics(folder: Path) -> dict[str, Any]:
    """``metrics.json`` checked as every file read back is: the numbers compare uses, finite and in range."""
    where = str(folder / "metrics.json")
    try:
        metrics = read_json((folder / "metrics.json").read_bytes(), where)
        for key in ("accuracy", "mean_class_accuracy", "macro_f1"):
            expect(metrics, key, where, (int, float), lo=0.0, hi=1.0)
        expect(metrics, "n", where, int, lo=0, hi=MAX_ROWS)
        names = expect(metrics, "class_names", where, list)
        if not names or len(names) > 10_000 or not all(isinstance(c, str) and 0 < len(c) <= MAX_CELL for c in names):
            raise SchemaError(f"{where}: class_names; expected a list of class names")
        per_class = expect(metrics, "per_class", where, dict)
        for name in names:
            expect(expect(per_class, name, f"{where} per_class", dict), "f1", f"{where} per_class {name!r}",
                   (int, float), lo=0.0, hi=1.0)
    except OSError as exc:
        raise ConfigError(f"{folder}: no readable metrics.json ({exc.strerror or exc})") from None
    except SchemaError as exc:
        raise ConfigError(f"{exc} (is this a ceprompt evaluation?)") from None
    return metrics


def _read_eval(folder: Path, name: str, config: dict[str, Any]) -> Evaluated:
    result = Evaluated(name, _metrics(folder), dotted(config))
    predictions = folder / "predictions.csv"
    if not predictions.is_file():
        return result
    where = str(predictions)
    try:
        with open(predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if not {"path", "true", "predicted"} <= set(header):
                raise ConfigError(f"{where}: no path, true and predicted columns; expected a ceprompt evaluation's "
                                  "predictions.csv")
            at = {c: header.index(c) for c in ("path", "true", "predicted")}
            for line, row in enumerate(reader, 2):
                if len(row) != len(header) or any(len(cell) > MAX_CELL for cell in row) or line > MAX_ROWS:
                    raise ConfigError(f"{where}:{line}: {len(row)} cells of up to {max(map(len, row), default=0)} "
                                      f"characters; expected {len(header)} cells of at most {MAX_CELL}")
                path = _unquoted(row[at["path"]])
                result.right[path] = _unquoted(row[at["true"]]) == _unquoted(row[at["predicted"]])
                result.truth[path] = _unquoted(row[at["true"]])
    except csv.Error as exc:  # a cell over the csv module's own limit, a NUL byte
        raise ConfigError(f"{where}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror or exc})") from None
    return result


def _checkpoint_config(metrics_file: Path) -> dict[str, Any]:
    """The training config recorded with the checkpoint an evaluation folder names, when it is still there."""
    try:
        checkpoint = read_json(metrics_file.read_bytes(), str(metrics_file)).get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint.endswith(".safetensors") or "\0" in checkpoint:
            return {}
        sidecar = Path(checkpoint).with_suffix(".json")
        config = read_json(sidecar.read_bytes(), str(sidecar)).get("config", {}) if sidecar.is_file() else {}
        return config if isinstance(config, dict) else {}
    except (OSError, SchemaError, AttributeError, ValueError):
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


def _applies(key: str, settings: dict[str, Any]) -> bool:
    """A setting worth listing: not a place or this machine, and not of a stage the run did not train."""
    section = key.split(".", 1)[0]
    return key not in NOT_SETTINGS and (section not in STAGES or section == settings.get("stage"))


def _group_key(e: Evaluated) -> str:
    """Runs that differ only in their seed (and were scored on the same classes) share a key; an evaluation whose
    settings are unknown (its checkpoint's description is gone) is a group of its own."""
    if not e.settings:
        return json.dumps({"unknown settings": e.name})
    known = {k: v for k, v in e.settings.items() if _applies(k, e.settings)}
    return json.dumps({**known, "scored classes": e.metrics["class_names"]}, sort_keys=True, default=str)


def compare(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Everything ``ceprompt compare`` prints, as data."""
    evaluations = [e for p in paths for e in find_evaluations(p)]
    if not evaluations:
        raise ConfigError("nothing to compare")
    classes = list(dict.fromkeys(c for e in evaluations for c in e.metrics["class_names"]))  # every list's, in order
    groups: dict[str, list[Evaluated]] = {}
    for e in evaluations:
        groups.setdefault(_group_key(e), []).append(e)
    rows = [_row(group) for group in groups.values()]
    keys = sorted({k for e in evaluations for k in e.settings if _applies(k, e.settings)})
    differing = [k for k in keys if len({json.dumps(e.settings.get(k), default=str) for e in evaluations}) > 1]
    settings = {k: [g[0].settings.get(k) for g in groups.values()] for k in differing}
    pairs = []
    comparable = [e for e in evaluations if e.right]
    for a, b in itertools.combinations(comparable, 2):
        if a.truth.keys() != b.truth.keys() or any(a.truth[p] != b.truth[p] for p in a.truth):
            continue  # not the same images
        order = sorted(a.right)
        ra, rb = [a.right[p] for p in order], [b.right[p] for p in order]
        test = mcnemar(ra, rb)  # its own b and c are the discordant counts: renamed, never over B's name
        pairs.append({"a": a.name, "b": b.name, "n": len(order), "a_only": test["b"], "b_only": test["c"],
                      "p_value": test["p_value"], "method": test["method"], **bootstrap_difference(ra, rb)})
    return {"classes": classes, "rows": rows, "settings": settings, "pairs": pairs,
            "groups": [[e.name for e in g] for g in groups.values()]}


def _row(group: list[Evaluated]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        return dict(zip(("mean", "std"), mean_std(values)))

    classes = group[0].metrics["class_names"]
    more = len(group) - 1
    name = group[0].name if not more else f"{group[0].name} (+{more} seed{'s' if more > 1 else ''})"
    return {
        "name": name, "runs": len(group), "n": group[0].metrics.get("n"),
        **{key: stat([e.metrics[key] for e in group]) for key in ("accuracy", "mean_class_accuracy", "macro_f1")},
        "f1": {c: stat([e.metrics["per_class"][c]["f1"] for e in group]) for c in classes},
    }


def _cell(value: dict[str, float] | None, several: bool) -> str:
    if value is None:
        return "-"  # a class this evaluation did not score
    return f"{value['mean']:.4f} ± {value['std']:.4f}" if several else f"{value['mean']:.4f}"


def _setting(value: Any) -> str:
    """A setting as a config file writes it (null, true, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def markdown(result: dict[str, Any]) -> str:
    classes = result["classes"]
    lines = ["| run | images | accuracy | mean class accuracy | macro-F1 | " +
             " | ".join(f"F1 {c}" for c in classes) + " |", "|---" * (5 + len(classes)) + "|"]
    for row in result["rows"]:
        several = row["runs"] > 1
        lines.append(f"| {row['name']} | {row['n']} | {_cell(row['accuracy'], several)} | "
                     f"{_cell(row['mean_class_accuracy'], several)} | {_cell(row['macro_f1'], several)} | " +
                     " | ".join(_cell(row["f1"].get(c), several) for c in classes) + " |")
    if any(row["runs"] > 1 for row in result["rows"]):
        lines += ["", "Runs that differ only in their seed are one row: mean ± sample standard deviation."]
    if result["settings"]:
        lines += ["", "Settings that differ:", "", "| setting | " + " | ".join(r["name"] for r in result["rows"]) + " |",
                  "|---" * (1 + len(result["rows"])) + "|"]
        lines += [f"| `{k}` | " + " | ".join(_setting(v) for v in values) + " |"
                  for k, values in result["settings"].items()]
    if result["pairs"]:
        lines += ["", "On the same test images (McNemar's exact test on the images exactly one gets right; 95% "
                  "bootstrap interval of the accuracy difference):", "",
                  "| A | B | accuracy A - B [95% CI] | A right, B wrong | A wrong, B right | McNemar p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | "
                  f"{p['a_only']} | {p['b_only']} | {p['p_value']:.4g} |" for p in result["pairs"]]
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
                             *[row["f1"][c]["mean"] if c in row["f1"] else "" for c in classes]])


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
        missing = {"mean": np.nan, "std": 0.0}  # a class this row did not score: no bar
        errors = [row["f1"].get(c, missing)["std"] for c in classes] if row["runs"] > 1 else None
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [row["f1"].get(c, missing)["mean"] for c in classes], width,
               yerr=errors, label=label, capsize=2)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class F1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, 110)
