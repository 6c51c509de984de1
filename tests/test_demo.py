"""The embedded default: generated faces in the RAF-DB layout, and the quick demo learning end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ceprompt.cli import main
from ceprompt.data.datasets import RAFDB_CLASSES, load_splits
from ceprompt.demo.faces import generate, write_rafdb_dataset

from helpers import precision_agreement


def test_generated_dataset_uses_rafdb_layout(tmp_path: Path) -> None:
    root = write_rafdb_dataset(tmp_path / "faces", n_train=14, n_test=7, seed=3, size=48)
    assert sorted(p.name for p in (root / "EmoLabel").iterdir()) == [
        "image_class_labels.txt", "images.txt", "train_test_split.txt"]
    splits = load_splits("rafdb", root)
    assert len(splits.train) == 14 and len(splits.test) == 7
    assert sorted(s.label for s in splits.test) == list(range(7))
    assert Image.open(splits.train[0].path).size == (48, 48)
    # labels in the file are RAF-DB's 1..7
    labels = {line.split()[1] for line in (root / "EmoLabel" / "image_class_labels.txt").read_text().splitlines()}
    assert labels == {str(i) for i in range(1, 8)}


def test_generator_is_reproducible_and_captions_never_name_emotions() -> None:
    a, b = generate(21, seed=5, size=32), generate(21, seed=5, size=32, workers=2)
    assert [f.caption for f in a] == [f.caption for f in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    words = {w.strip(",;.") for f in generate(350, seed=9, size=32) for w in f.caption.split()}
    assert not words & set(RAFDB_CLASSES) and not words & {"happiness", "angry", "sadness", "fearful"}
    assert len({f.attributes for f in a}) > 7  # appearance varies within a class


def test_quick_demo_learns_beyond_zero_shot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path / "cache"))  # builds its own demo CLIP
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    zero_shot, stage1, stage2 = (row["accuracy"] for row in results["rows"])
    chance = results["chance"]
    assert stage1 > 2 * chance and stage2 > 2 * chance, results["rows"]
    assert stage1 > zero_shot + 0.1 and stage2 > zero_shot + 0.1, results["rows"]
    # the table's numbers are the runs' own evaluations
    assert stage2 == json.loads((out / "stage2" / "eval" / "metrics.json").read_text())["accuracy"]
    for name in ("confusion_matrix.png", "training_curves.png", "examples.png"):
        with Image.open(out / "report" / name) as img:
            assert img.size[0] > 400 and img.size[1] > 200
    assert list((tmp_path / "cache" / "demo").glob("clip-demo-vit-*.safetensors"))
    # bf16 (precision auto on CPUs with native bf16) gives the answers fp32 gives on the demo's test faces
    test_faces = [Image.open(p) for p in sorted((out / "data" / "Image" / "aligned_224").glob("test_*"))]
    assert len(test_faces) == 350
    for stage in ("stage1", "stage2"):
        same, worst = precision_agreement(out / stage, test_faces)
        assert same >= 0.99 and worst <= 0.03, (stage, same, worst)  # bf16 keeps 8 bits of mantissa


def test_several_seeds_are_reported_as_mean_and_std() -> None:
    from ceprompt.demo.report import format_table, results_markdown
    from ceprompt.demo.report import seed_row as _row

    rows = [_row("zero-shot CLIP", [{"accuracy": 0.1, "macro_f1": 0.05}]),
            _row("after stage 1 (EVA)", [{"accuracy": a, "macro_f1": a - 0.1} for a in (0.6, 0.7, 0.8)])]
    assert rows[1]["accuracy"] == pytest.approx(0.7) and rows[1]["accuracy_std"] == pytest.approx(0.1)
    assert rows[0]["accuracy_std"] == 0.0
    results = {"rows": rows, "chance": 1 / 7, "seeds": [0, 1, 2], "n_train": 10, "n_test": 5, "threads": 2,
               "seconds": {"stage 1": 12.34, "total": 20.0}}
    table = format_table(results)
    assert "mean ± std over 3 seeds" in table and "0.700 ± 0.100" in table
    md = results_markdown(results)
    assert "| after stage 1 (EVA) | 0.700 ± 0.100 | 0.600 ± 0.100 |" in md and "| stage 1 | 12.3 |" in md
    assert "{" not in md  # step times as a table, not a Python dict
