"""ceprompt compare (verbs/compare.py): the tables it prints, and evaluation folders that are not what they claim."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ceprompt.cli import main
from ceprompt.data.datasets import FERDataset, Sample
from ceprompt.engine.evaluate import write_report
from ceprompt.engine.metrics import classification_metrics
from ceprompt.engine.significance import bootstrap_difference


def evaluation(folder: Path, classes: list[str], truth: list[int], predicted: list[int]) -> Path:
    """An evaluation folder written by the evaluator's own report writer (metrics.json, predictions.csv)."""
    scores = np.full((len(truth), len(classes)), 0.1)
    scores[np.arange(len(truth)), predicted] = 0.9
    data = FERDataset([Sample(f"img/{i:03d}.png", t) for i, t in enumerate(truth)], lambda x: x, lambda x: x)
    metrics = classification_metrics(np.array(truth), np.array(predicted), classes)
    return write_report(folder, data, classes, scores, metrics)


CLASSES = ["surprise", "fear", "happy"]
TRUTH = [i % 3 for i in range(30)]


def test_the_pairwise_table_names_both_evaluations_and_counts_each_way(tmp_path: Path, capsys) -> None:
    a = evaluation(tmp_path / "a", CLASSES, TRUTH, TRUTH)  # all right
    wrong = list(TRUTH)
    for i in (0, 1, 2, 3):  # B gets 4 wrong that A gets right
        wrong[i] = (wrong[i] + 1) % 3
    b = evaluation(tmp_path / "b", CLASSES, TRUTH, wrong)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {a} | {b} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == str(a) and cells[1] == str(b) and cells[3:5] == ["4", "0"]


def test_evaluations_of_different_class_lists_compare_side_by_side(tmp_path: Path, capsys) -> None:
    a = evaluation(tmp_path / "a", CLASSES, TRUTH, TRUTH)
    b = evaluation(tmp_path / "b", ["happy", "sad", "bored"], TRUTH, TRUTH)  # eval --classes happy,sad,bored
    assert main(["compare", str(a), str(b), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert "F1 surprise" in header and "F1 bored" in header
    assert "| - |" in out  # a class an evaluation did not score


@pytest.mark.parametrize("metrics, message", [
    ({"accuracy": "0.9"}, "accuracy='0.9'; expected"),
    ({}, "accuracy is missing"),
    ([1, 2], "expected a JSON object"),
    ({"accuracy": 1.5}, "accuracy=1.5; expected a number in [0.0, 1.0]"),
])
def test_a_crafted_metrics_file_is_one_line(tmp_path: Path, capsys, metrics, message: str) -> None:
    good = evaluation(tmp_path / "good", CLASSES, TRUTH, TRUTH)
    bad = evaluation(tmp_path / "bad", CLASSES, TRUTH, TRUTH)
    real = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**real, **metrics} if isinstance(metrics, dict) and metrics else
                                                 metrics))
    assert main(["compare", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("text, message", [
    ('"accuracy": 1e999', "is not a finite number"),
    ('"n": 1' + "0" * 5000, "an integer of 5001 digits"),
])
def test_numbers_json_cannot_hold_are_refused(tmp_path: Path, capsys, text: str, message: str) -> None:
    bad = evaluation(tmp_path / "bad", CLASSES, TRUTH, TRUTH)
    raw = (bad / "metrics.json").read_text()
    key = text.split(":")[0]
    (bad / "metrics.json").write_text(re.sub(key + r': [^,\n]+', text, raw, count=1))
    assert main(["compare", str(bad), str(bad)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("rows, message", [
    ("name,true,predicted\na,x,x\n", "no path, true and predicted columns"),
    ("path,true,predicted\nimg/1.png,happy\n", "2 cells"),
    ("path,true,predicted\n" + "x" * 200_000 + ",a,a\n", "not a readable CSV"),
])
def test_a_crafted_predictions_file_is_one_line(tmp_path: Path, capsys, rows: str, message: str) -> None:
    bad = evaluation(tmp_path / "bad", CLASSES, TRUTH, TRUTH)
    (bad / "predictions.csv").write_text(rows)
    assert main(["compare", str(bad), str(bad)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_settings_that_differ_are_those_that_apply_written_as_in_a_config(tmp_path: Path, capsys) -> None:
    import yaml

    from ceprompt.experiment.config import Config

    for name, seed, grad_clip in (("r1", 1, None), ("r2", 2, 1.0), ("r3", 3, None)):
        run = tmp_path / name
        evaluation(run / "eval", CLASSES, TRUTH, TRUTH)
        config = Config().validate().to_dict()
        config["run"]["seed"], config["optim"]["grad_clip"] = seed, grad_clip
        config["cat"]["prompt_depth"] = seed  # stage 2's setting, in stage-1 runs: not a difference
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "`optim.grad_clip` | null | 1.0 |" in out and "cat.prompt_depth" not in out
    assert "(+1 seed)" in out and "None" not in out


def test_the_bootstrap_memory_does_not_grow_with_the_images() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(150_000) < 0.8, rng.random(150_000) < 0.78
    tracemalloc.start()
    result = bootstrap_difference(a, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20  # drawing 2000 x 150,000 indices took 5 GB
    assert result["ci_low"] < result["difference"] < result["ci_high"]
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
