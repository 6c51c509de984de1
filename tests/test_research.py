"""What a research user needs around training (issue 24): a validation split, experiment trackers, comparing runs
with a significance test, features out of the model, training from Python."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import ceprompt
import ceprompt.engine.train as train_module
from ceprompt.cli import main
from ceprompt.core.errors import ConfigError

from helpers import class_image, quick_train_sets, write_three_file_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_three_file_dataset(tmp_path_factory.mktemp("research") / "RAF-DB", "rafdb", n_train=5, n_test=3)


def sets(root: Path, name: str, data: Path, *extra: str) -> list[str]:
    return quick_train_sets(data, root, name, "backbone.arch=tiny-vit", "run.log_to=[]", *extra, epochs=2)


def summary(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_validation_split_chooses_the_epoch_and_the_test_split_is_evaluated_once(tmp_path: Path, data: Path,
                                                                                   monkeypatch) -> None:
    sizes: list[int] = []
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda net, dataset, *a, **k: sizes.append(len(dataset)) or
                        real(net, dataset, *a, **k))
    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "v", data, "data.val_fraction=0.4")]) == 0
    run = tmp_path / "v"
    held = (run / "val_images.txt").read_text().splitlines()
    assert len(held) == 14  # 2 of each class's 5 training images
    # each epoch and the final calibration on the 14 validation images; the 21 test images once
    assert sorted(sizes) == [14, 14, 14, 21]
    rows = summary(run)
    assert all(r["val_accuracy"] and "test_accuracy" not in r for r in rows)  # no empty test_* columns
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert "validation split" in report["epoch_chosen_on"] and report["calibration"]["fit_on"] == "validation split"
    assert set(report["validation"]) >= {"accuracy", "macro_f1"}
    train_paths = {line.split()[1] for line in (data / "EmoLabel" / "images.txt").read_text().splitlines()}
    assert all(Path(line.split(" ", 1)[1]).name in train_paths for line in held)


def test_with_shots_the_validation_split_is_held_out_first_and_still_chooses(tmp_path: Path, data: Path) -> None:
    # shots=1 used to leave nothing to hold out: the epoch was silently chosen on the test split
    assert main(["train", "--config", "rafdb_stage1",
                 *sets(tmp_path, "k1", data, "data.val_fraction=0.2", "data.shots=1")]) == 0
    run = tmp_path / "k1"
    shots = (run / "train_images.txt").read_text().splitlines()
    held = (run / "val_images.txt").read_text().splitlines()
    assert len(shots) == 7 and len(held) == 7 and not set(shots) & set(held)
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert "validation split" in report["epoch_chosen_on"]


def test_a_validation_split_that_holds_nothing_is_refused(tmp_path: Path) -> None:
    single = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=1, n_test=1)
    with pytest.raises(ConfigError, match="nothing can be held out"):
        ceprompt.train("rafdb_stage1", data__root=single, data__val_fraction=0.2, backbone__arch="tiny-vit",
                       run__output_dir=tmp_path, run__device="cpu", data__workers=0, run__progress=False)
    assert not list(tmp_path.glob("rafdb-*"))


def test_the_paper_protocol_is_the_default_and_says_so(tmp_path: Path, data: Path) -> None:
    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "t", data)]) == 0
    report = json.loads((tmp_path / "t" / "eval" / "metrics.json").read_text())
    assert "test split (the paper's protocol)" in report["epoch_chosen_on"] and report["validation"] is None
    assert all(r["test_accuracy"] and "val_accuracy" not in r for r in summary(tmp_path / "t"))


def test_tensorboard_receives_the_scalars_config_and_confusion_matrix(tmp_path: Path, data: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "tb", data, "run.log_to=[tensorboard]")]) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "test/accuracy", "train/lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("test/accuracy")] == [1, 2]
    assert "confusion_matrix" in tags["images"] and "config/text_summary" in tags["tensors"]


def test_offline_wandb_and_a_local_mlflow_store_receive_the_scalars(tmp_path: Path, data: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    mlflow = pytest.importorskip("mlflow", reason="mlflow is optional (pip install mlflow-skinny)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # ceprompt sets it for its file store
    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "w", data, "run.log_to=[wandb, mlflow]")]) == 0
    run = tmp_path / "w"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    client = mlflow.MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    found = client.search_runs([client.get_experiment_by_name("ceprompt").experiment_id])
    assert len(found) == 1 and {"test_accuracy", "train_loss", "final_accuracy"} <= set(found[0].data.metrics)
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "test_accuracy")] == [1, 2]
    assert wandb  # imported: the library was there


def test_a_missing_tracker_costs_one_line(tmp_path: Path, data: Path, caplog, monkeypatch) -> None:
    import ceprompt.engine.reporting as reporting

    monkeypatch.setattr(reporting, "installed_trackers", lambda: {"tensorboard": True, "wandb": False, "mlflow": False})
    with caplog.at_level(logging.WARNING, logger="ceprompt"):
        assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "m", data, "run.log_to=[wandb]")]) == 0
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(lines) == 1 and "pip install wandb" in lines[0]


def test_compare_gives_the_table_and_a_mcnemar_p_value_checked_by_hand(tmp_path: Path, data: Path, capsys) -> None:
    for name, lr in (("a", "1e-4"), ("b", "1e-3")):
        assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, name, data, f"optim.lr={lr}")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(tmp_path / "c.csv"),
                 "--plot", str(tmp_path / "f1.png")]) == 0
    out = capsys.readouterr().out
    assert "| `optim.lr` | 0.0001 | 0.001 |" in out and "McNemar" in out
    right = {}
    for name in ("a", "b"):
        with open(tmp_path / name / "eval" / "predictions.csv", newline="") as fh:
            right[name] = {r["path"]: r["true"] == r["predicted"] for r in csv.DictReader(fh)}
    b = sum(right["a"][p] and not right["b"][p] for p in right["a"])
    c = sum(not right["a"][p] and right["b"][p] for p in right["a"])
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
    assert f"| {b} | {c} | {p:.4g} |" in out
    with open(tmp_path / "c.csv", newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert Image.open(tmp_path / "f1.png").size[0] > 300


def test_compare_groups_seeds_as_mean_and_std(tmp_path: Path, data: Path, capsys) -> None:
    for seed in (1, 2):
        assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path / "seeds", f"s{seed}", data,
                                                               f"run.seed={seed}")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "seeds")]) == 0
    out = capsys.readouterr().out
    assert "(+1 seed)" in out and " ± " in out and "mean ± sample standard deviation" in out


def test_mcnemar_and_bootstrap_against_known_values() -> None:
    from ceprompt.engine.significance import bootstrap_difference, mcnemar

    a = [True] * 10 + [False] * 2 + [True] * 30
    b = [False] * 10 + [True] * 2 + [True] * 30
    result = mcnemar(a, b)  # b=10, c=2: two-sided exact p = 2 * P(X <= 2), X ~ B(12, 1/2) = 2 * 79/4096
    assert (result["b"], result["c"]) == (10, 2) and result["p_value"] == pytest.approx(2 * 79 / 4096)
    interval = bootstrap_difference(a, b)
    assert interval["difference"] == pytest.approx(8 / 42) and interval["ci_low"] < 8 / 42 < interval["ci_high"]


def test_embeddings_have_the_models_width_unit_length_and_their_face(tmp_path: Path, data: Path) -> None:
    assert main(["train", "--config", "rafdb_stage1", *sets(tmp_path, "e", data)]) == 0
    rec = ceprompt.load(tmp_path / "e", device="cpu")
    images = [class_image(label, 7, seed=500 + label, size=64) for label in range(7)]
    faces = rec.embed(images, detect="none")
    assert len(faces) == 7 and [f.image for f in faces] == list(range(7))
    vectors = np.stack([f.embedding for f in faces])
    assert vectors.shape == (7, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert faces[0].box == (0.0, 0.0, 64.0, 64.0) and faces[0].label in rec.class_names
    folder = tmp_path / "faces"
    for label, name in enumerate(rec.class_names):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            class_image(label, 7, seed=900 + 10 * label + i, size=64).save(folder / name / f"{i}.png")
    out, plot = tmp_path / "feats.npz", tmp_path / "tsne.png"
    argv = ["embed", str(tmp_path / "e"), str(folder), "-o", str(out), "--detect", "none", "--plot", str(plot)]
    pytest.importorskip("sklearn")
    assert main(argv) == 0
    saved = np.load(out)
    assert saved["embeddings"].shape == (21, 64) and set(saved["folders"]) == set(rec.class_names)
    assert len(saved["paths"]) == 21 and Image.open(plot).size[0] > 300


def test_training_from_python_is_the_command_line_run(tmp_path: Path, data: Path) -> None:
    result = ceprompt.train("rafdb_stage1", data__root=data, backbone__arch="tiny-vit", data__workers=0,
                            optim__epochs=1, optim__batch_size=7, optim__warmup_epochs=0, run__output_dir=tmp_path,
                            run__name="api", run__device="cpu", run__progress=False, head__top_k=4, run__log_to=[])
    assert result.run_dir == tmp_path / "api" and result.stage == "eva" and result.checkpoint.is_file()
    assert result.metrics == json.loads((tmp_path / "api" / "eval" / "metrics.json").read_text())
    recorded = yaml.safe_load((tmp_path / "api" / "config.yaml").read_text())
    assert recorded["optim"]["epochs"] == 1 and recorded["run"]["log_to"] == []


def test_training_from_python_takes_values_not_text(tmp_path: Path, data: Path) -> None:
    """A sweep's numpy values, a single `sets` string: values as they are, never re-parsed as YAML."""
    result = ceprompt.train("rafdb_stage1", sets="optim.warmup_epochs=0", data__root=data, backbone__arch="tiny-vit",
                            data__workers=np.int64(0), optim__epochs=np.int64(1), optim__batch_size=np.int32(7),
                            run__output_dir=tmp_path, run__name="np", run__device="cpu", run__progress=False,
                            head__top_k=np.int64(4), run__log_to=[], run__final_eval=False)
    recorded = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert recorded["optim"]["epochs"] == 1 and recorded["optim"]["warmup_epochs"] == 0.0
    with pytest.raises(ceprompt.core.errors.ConfigError, match="expected a plain folder name"):
        ceprompt.train("rafdb_stage1", data__root=data, run__name="m\nx: 1", run__output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["np"]
