"""Classes are words (issue 22): classes matched by name or alias, unseen classes scored from their words,
``--classes``, base-to-novel and few-shot training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import ceprompt
from ceprompt.cli import main
from ceprompt.data.datasets import RAFDB_CLASSES

from helpers import (
    class_image,
    quick_train_sets,
    train_tiny_runs,
    write_folder_dataset,
    write_three_file_dataset,
)

ALIASED = {"surprise": "surprised", "fear": "scared", "disgust": "disgusted", "happy": "happiness", "sad": "sadness",
           "anger": "angry", "neutral": "neutral"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("classes"), n_train=3, threads=1)


def read_predictions(folder: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(folder / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), {row["path"]: row for row in reader}


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_aliased_folder_names_get_identical_predictions(runs, tmp_path: Path, stage: str) -> None:
    plain = write_folder_dataset(tmp_path / "plain", list(RAFDB_CLASSES), 1, 2, size=32)
    aliased = write_folder_dataset(tmp_path / "aliased", [ALIASED[c] for c in RAFDB_CLASSES], 1, 2, size=32)
    for root, out in ((plain, "e1"), (aliased, "e2")):
        assert main(["eval", "--checkpoint", str(runs[stage]), "--data", str(root), "--dataset", "folder", "--out",
                     str(tmp_path / out), "--no-progress", "--workers", "0", "--precision", "fp32"]) == 0
    _, first = read_predictions(tmp_path / "e1")
    columns, second = read_predictions(tmp_path / "e2")
    assert {f"score_{ALIASED[c]}" for c in RAFDB_CLASSES} <= set(columns)
    for path, row in first.items():
        name = Path(path).parent.name
        other = second[path.replace(f"/plain/test/{name}/", f"/aliased/test/{ALIASED[name]}/")]
        assert other["predicted"] == ALIASED[row["predicted"]]
        for c in RAFDB_CLASSES:
            assert float(other[f"score_{ALIASED[c]}"]) == pytest.approx(float(row[f"score_{c}"]), abs=1e-5)
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert all(c["seen"] for c in metrics["classes"]) and "angry -> anger (trained)" in metrics["class_mapping"]


def test_an_unseen_class_is_scored_from_its_words_with_its_own_column(runs, tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "faces", ["bored", "happy", "sad"], 1, 2, size=32)
    assert main(["eval", "--checkpoint", str(runs["s2"]), "--data", str(root), "--dataset", "folder", "--out",
                 str(tmp_path / "ev"), "--no-progress", "--workers", "0"]) == 0
    columns, rows = read_predictions(tmp_path / "ev")
    assert columns[3:] == ["score_bored", "score_happy", "score_sad"] and len(rows) == 6
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert [(c["name"], c["seen"]) for c in metrics["classes"]] == [("bored", False), ("happy", True), ("sad", True)]
    assert metrics["images_unseen"] == 2 and metrics["images_seen"] == 4
    assert metrics["accuracy_unseen"] is not None
    # a model trained on all seven classes, on one unseen class: cross-dataset figures, not base-to-novel (whose
    # "novel" accuracy among this one class would be 1 by construction)
    assert "base_to_novel" not in metrics


def test_classes_change_the_columns_of_predict_and_the_api(runs, tmp_path: Path, capsys) -> None:
    face = tmp_path / "face.png"
    class_image(3, 7, seed=5, size=32).save(face)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs["s1"]), str(face), "--detect", "none", "-o", str(out), "--no-progress",
                 "--classes", "joy,sadness,calm"]) == 0
    assert "class calm was not trained: scored from its own words" in capsys.readouterr().err
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert [h for h in header if h.startswith("prob_")] == ["prob_joy", "prob_sadness", "prob_calm"]
    rec = ceprompt.load(runs["s1"], device="cpu", precision="fp32")
    full = rec.predict(face, detect="none")[0].probabilities
    fewer = rec.with_classes(["happy", "sad"]).predict(face, detect="none")[0].probabilities
    assert list(fewer) == ["happy", "sad"] and sum(fewer.values()) == pytest.approx(1.0, abs=1e-6)
    # aliases are the trained classes: the same numbers under the names given
    aliased = rec.with_classes(["joy", "sadness"]).predict(face, detect="none")[0].probabilities
    assert list(aliased) == ["joy", "sadness"] and np.allclose(list(aliased.values()), list(fewer.values()))
    assert rec.predict(face, detect="none")[0].probabilities == full  # the original recognizer is unchanged
    assert rec.class_names == list(RAFDB_CLASSES)
    renamed = ceprompt.load(runs["s1"], device="cpu", classes=["angry", "happiness"], class_aliases=["calm=neutral"])
    assert renamed.classes_note is None and renamed.class_match.trained == [5, 3]


def test_the_api_takes_classes_per_request(runs, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient

    from ceprompt.server.app import create_app

    buf = io.BytesIO()
    class_image(3, 7, seed=5, size=32).save(buf, format="PNG")
    client = TestClient(create_app(ceprompt.load(runs["s2"], device="cpu")))
    files = {"file": ("face.png", buf.getvalue(), "image/png")}
    answer = client.post("/api/predict?detect=none&classes=happy,bored", files=files).json()
    assert answer["classes"] == ["happy", "bored"] and "bored" in answer["classes_note"]
    assert list(answer["faces"][0]["probabilities"]) == ["happy", "bored"]
    plain = client.post("/api/predict?detect=none", files=files).json()
    assert plain["classes"] == list(RAFDB_CLASSES) and "classes_note" not in plain
    assert client.post("/api/predict?detect=none&classes=happy,joy", files=files).status_code == 422


def test_base_to_novel_reports_base_novel_and_h(tmp_path: Path) -> None:
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=3, n_test=2)
    sets = quick_train_sets(data, tmp_path, "b2n", "backbone.arch=tiny-vit", "optim.batch_size=6", "run.log_to=[]",
                            "data.base_classes=[surprise, fear, happy]")
    assert main(["train", "--config", "rafdb_stage1", *sets]) == 0
    meta = json.loads((tmp_path / "b2n" / "checkpoints" / "best.json").read_text())
    assert meta["class_names"] == ["surprise", "fear", "happy"]
    assert main(["eval", "--checkpoint", str(tmp_path / "b2n"), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--workers", "0"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    b2n = metrics["base_to_novel"]
    assert metrics["images_seen"] == 6 and metrics["images_unseen"] == 8
    assert b2n["h"] == pytest.approx(2 * b2n["base"] * b2n["novel"] / (b2n["base"] + b2n["novel"])) if (
        b2n["base"] + b2n["novel"]) else b2n["h"] is None
    # base accuracy is measured among the base classes only: recompute it from the saved scores
    _, rows = read_predictions(tmp_path / "ev")
    base = ["surprise", "fear", "happy"]
    right = [max(base, key=lambda c: float(r[f"score_{c}"])) == r["true"] for r in rows.values() if r["true"] in base]
    assert b2n["base"] == pytest.approx(sum(right) / len(right))


def test_shots_train_on_exactly_k_per_class_and_the_list_reproduces(tmp_path: Path) -> None:
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=4, n_test=1)

    def run(name: str) -> list[str]:
        sets = quick_train_sets(data, tmp_path, name, "backbone.arch=tiny-vit", "run.log_to=[]", "data.shots=2",
                                "run.seed=3")
        assert main(["train", "--config", "rafdb_stage1", *sets]) == 0
        return (tmp_path / name / "train_images.txt").read_text().splitlines()

    first = run("k2")
    assert len(first) == 14 and all(sum(line.split()[0] == c for line in first) == 2 for c in RAFDB_CLASSES)
    assert run("k2-again") == first


@pytest.mark.parametrize("argv_extra, message", [
    (["--set", "data.class_aliases=[joyful]"], "ALIAS=CLASS"),
    (["--set", "data.shots=9"], "fewer training images"),
    (["--set", "data.base_classes=[happy, bored]"], "not in rafdb's classes"),
    (["--set", "data.base_classes=[happy, joy]"], "are the same class"),
    (["--set", "data.base_classes=[happy]"], "at least two classes"),
])
def test_bad_protocol_settings_are_one_line_before_any_model(tmp_path: Path, capsys, monkeypatch, argv_extra,
                                                             message) -> None:
    import ceprompt.engine.train as train_module

    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=2, n_test=1)
    monkeypatch.setattr(train_module, "build_for_training", lambda *a: pytest.fail("a model was built"))
    sets = ["backbone.arch=tiny-vit", f"data.root={data}", "data.workers=0", f"run.output_dir={tmp_path}",
            "run.device=cpu", "data.base_classes=[happy, sad]" if "shots" in argv_extra[1] else "run.seed=0"]
    argv = ["train", "--config", "rafdb_stage1", *[a for s in sets for a in ("--set", s)], *argv_extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("classes, message", [("", "empty class name"), ("angry,anger", "are the same class"),
                                              ("happy,,sad", "empty class name")])
def test_bad_class_lists_are_refused_by_the_parser(runs, tmp_path: Path, capsys, classes: str, message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(runs["s1"]), str(tmp_path), "--classes", classes])
    assert exc.value.code == 2 and message in capsys.readouterr().err
