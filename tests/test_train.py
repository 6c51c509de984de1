"""Both stages trained end to end on a tiny CLIP and generated data, on the CPU; eval reports; resume; DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ceprompt.cli import main

from helpers import quick_train_sets, write_folder_dataset, write_three_file_dataset


def tiny(tmp_path: Path, data: Path, name: str, *extra: str, dataset: str = "rafdb") -> list[str]:
    return quick_train_sets(data, tmp_path / "runs", name, "backbone.arch=tiny-vit", f"data.dataset={dataset}",
                            "optim.batch_size=8", "optim.warmup_epochs=0.5", "cat.prompt_depth=3", *extra, epochs=2)


@pytest.fixture(scope="module")
def rafdb(tmp_path_factory) -> Path:
    return write_three_file_dataset(tmp_path_factory.mktemp("data") / "RAF-DB", "rafdb", n_train=3, n_test=2)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_report(folder: Path, n: int) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = read_csv(folder / "predictions.csv")
    assert len(rows) == n == metrics["n"]
    recomputed = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    assert metrics["accuracy"] == pytest.approx(recomputed)
    cm = [[int(v) for v in list(r.values())[1:]] for r in read_csv(folder / "confusion_matrix.csv")]
    assert cm == metrics["confusion_matrix"] and sum(map(sum, cm)) == n
    assert (folder / "confusion_matrix.png").stat().st_size > 1000
    return metrics


def check_run_dir(run: Path, epochs: int, n_test: int) -> None:
    for name in ("config.yaml", "train.log", "summary.csv", "resume.pt", "checkpoints/last.safetensors",
                 "checkpoints/last.json", "checkpoints/best.safetensors", "checkpoints/best.json"):
        assert (run / name).is_file(), name
    rows = read_csv(run / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert all(float(r["train_loss"]) > 0 and r["test_accuracy"] for r in rows)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["test_metrics"]["accuracy"] == pytest.approx(max(float(r["test_accuracy"]) for r in rows), abs=1e-6)
    final = check_report(run / "eval", n_test)
    assert final["accuracy"] == pytest.approx(best["test_metrics"]["accuracy"])
    torch.load(run / "resume.pt", weights_only=True)


def test_both_stages_train_and_evaluate(tmp_path: Path, rafdb: Path, capsys) -> None:
    assert main(["train", "--config", "rafdb_stage1", *tiny(tmp_path, rafdb, "s1")]) == 0
    run1 = tmp_path / "runs" / "s1"
    check_run_dir(run1, 2, 14)
    meta = json.loads((run1 / "checkpoints" / "last.json").read_text())
    assert meta["stage"] == "eva" and meta["class_names"][0] == "surprise"
    assert meta["preprocess"] == {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "interpolation": "bicubic", "resize": "square"}
    weights = load_file(run1 / "checkpoints" / "last.safetensors")
    assert all(k.startswith(("visual.transformer.resblocks.", "visual.ln_post", "visual.proj")) for k in weights)
    assert not any(k.startswith(("visual.transformer.resblocks.0.", "visual.transformer.resblocks.1.")) for k in weights)

    assert main(["train", "--config", "rafdb_stage2", "--init", str(run1), *tiny(tmp_path, rafdb, "s2")]) == 0
    run2 = tmp_path / "runs" / "s2"
    check_run_dir(run2, 2, 14)
    weights2 = load_file(run2 / "checkpoints" / "best.safetensors")
    assert weights2 and all(k.startswith("prompt_learner.") for k in weights2)

    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(run2), "--data", str(rafdb), "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    metrics = check_report(out, 14)
    assert metrics["accuracy"] == pytest.approx(json.loads((run2 / "eval" / "metrics.json").read_text())["accuracy"])
    assert metrics["stage"] == "cat"

    zs = tmp_path / "zero-shot"
    assert main(["eval", "--zero-shot", "--config", "rafdb_stage1", "--set", "backbone.arch=tiny-vit", "--data",
                 str(rafdb), "--out", str(zs), "--no-progress", "--device", "cpu"]) == 0
    check_report(zs, 14)
    # the run directory and report folders are never silently reused
    capsys.readouterr()
    assert main(["train", "--config", "rafdb_stage1", *tiny(tmp_path, rafdb, "s1")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run1 / "checkpoints" / "last.safetensors").is_file()
    assert main(["eval", "--checkpoint", str(run2), "--data", str(rafdb), "--out", str(out), "--no-progress"]) == 1


@pytest.mark.parametrize("dataset", ["affectnet8", "ferplus"])
def test_other_layouts_train(tmp_path: Path, dataset: str) -> None:
    root = write_three_file_dataset(tmp_path / dataset, dataset, n_train=2, n_test=1)
    args = tiny(tmp_path, root, dataset, "optim.epochs=1", "optim.warmup_epochs=0", dataset=dataset)
    assert main(["train", "--config", f"{dataset}_stage1", *args]) == 0
    meta = json.loads((tmp_path / "runs" / dataset / "checkpoints" / "last.json").read_text())
    assert len(meta["class_names"]) == 8


def test_folder_dataset_trains_with_accumulation(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "faces", ["calm", "happy", "tense"], 4, 2)
    args = tiny(tmp_path, root, "folder", "optim.epochs=1", "optim.accum_steps=2", "optim.warmup_epochs=0",
                dataset="folder")
    assert main(["train", "--config", "rafdb_stage1", *args]) == 0
    run = tmp_path / "runs" / "folder"
    assert json.loads((run / "checkpoints" / "last.json").read_text())["class_names"] == ["calm", "happy", "tense"]
    check_report(run / "eval", 6)


def test_resume_matches_uninterrupted_run(tmp_path: Path, rafdb: Path, monkeypatch) -> None:
    common = ["--config", "rafdb_stage1", "--deterministic"]
    assert main(["train", *common, *tiny(tmp_path, rafdb, "full", "optim.epochs=3")]) == 0

    from ceprompt.engine.reporting import Reporter

    original = Reporter.epoch

    def crash_after_first_epoch(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt  # as if the process died right after epoch 1 was saved

    monkeypatch.setattr(Reporter, "epoch", crash_after_first_epoch)
    assert main(["train", *common, *tiny(tmp_path, rafdb, "cut", "optim.epochs=3")]) == 130
    monkeypatch.setattr(Reporter, "epoch", original)
    cut = tmp_path / "runs" / "cut"
    assert torch.load(cut / "resume.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--resume", str(cut)]) == 0

    full = load_file(tmp_path / "runs" / "full" / "checkpoints" / "last.safetensors")
    resumed = load_file(cut / "checkpoints" / "last.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert len(read_csv(cut / "summary.csv")) == 3


def test_ddp_two_processes_on_cpu(tmp_path: Path, rafdb: Path) -> None:
    args = tiny(tmp_path, rafdb, "ddp", "optim.epochs=1", "optim.warmup_epochs=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ceprompt",
           "train", "--config", "rafdb_stage1", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broadcast_buffers" not in proc.stderr  # torch's deprecation warning asks nothing of the user
    run = tmp_path / "runs" / "ddp"
    check_run_dir(run, 1, 14)
    log = (run / "train.log").read_text()
    assert "x 2 process(es)" in log
    ddp_metrics = json.loads((run / "eval" / "metrics.json").read_text())
    out = tmp_path / "single"
    assert main(["eval", "--checkpoint", str(run), "--data", str(rafdb), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--workers", "0"]) == 0
    single = json.loads((out / "metrics.json").read_text())
    assert single["accuracy"] == pytest.approx(ddp_metrics["accuracy"])
    assert single["confusion_matrix"] == ddp_metrics["confusion_matrix"]
