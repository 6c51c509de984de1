"""Hostile and careless use, third round (issue 32): outputs that never look finished when they are not, every
file read back checked, protocols that are the configured ones, class names compared as the model reads them,
degenerate images refused, decoder and tracker failures contained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ceprompt
from ceprompt.cli import main
from ceprompt.core.errors import CepromptError

from helpers import rows_of, train_tiny_runs, write_three_file_dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("round3"))



def gradient(size: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, (seed * 37) % 256)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


# --- outputs that look finished only when they are -------------------------------------------------------

def test_sigterm_during_predict_leaves_no_output_and_the_rerun_continues(runs, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(240):
        gradient(900, i).save(photos / f"{i:03d}.jpg", quality=80)
    out = tmp_path / "out.csv"
    parts = tmp_path / ".out.csv.ceprompt-parts"
    cmd = [sys.executable, "-m", "ceprompt", "predict", str(runs["s1"]), str(photos), "--detect", "none", "-o",
           str(out), "--batch-size", "4", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not (parts.is_dir() and any(parts.glob("*.jsonl"))):
            time.sleep(0.01)  # the first finished share: rows exist, the run is not done
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and not out.exists()  # nothing that looks like a result, nothing that blocks a rerun
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv") and p.name.endswith(".tmp")]
    kept = len(list(parts.glob("*.jsonl")))
    assert kept >= 1
    assert main(cmd[3:]) == 0
    assert len(rows_of(out)) == 240 and not parts.exists()


def test_outputs_are_never_written_through_a_link(runs, tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    gradient(64, 1).save(image)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("the user's file\n")
    link = tmp_path / "out.csv"
    link.symlink_to(elsewhere)
    assert main(["predict", str(runs["s1"]), str(image), "--detect", "none", "-o", str(link), "--overwrite"]) == 0
    assert elsewhere.read_text() == "the user's file\n" and not link.is_symlink() and rows_of(link)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere" / "target.csv")
    assert main(["predict", str(runs["s1"]), str(image), "--detect", "none", "-o", str(dangling),
                 "--overwrite"]) == 0
    assert not (tmp_path / "nowhere").exists() and not dangling.is_symlink()
    annotated = tmp_path / "annotated"
    annotated.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (annotated / "00000_face.png").symlink_to(victim)  # the name the annotated picture gets
    assert main(["predict", str(runs["s1"]), str(image), "--detect", "none", "-o", str(tmp_path / "a.csv"),
                 "--annotate", str(annotated), "--overwrite"]) == 0
    assert victim.read_bytes() == b"keep me" and not (annotated / "00000_face.png").is_symlink()
    assert Image.open(annotated / "00000_face.png").size == (64, 64)


def test_embed_refuses_one_file_for_two_outputs(runs, tmp_path: Path, capsys) -> None:
    image = tmp_path / "face.png"
    gradient(64, 1).save(image)
    assert main(["embed", str(runs["s1"]), str(image), "-o", str(tmp_path / "x.png"), "--plot",
                 str(tmp_path / "x.png"), "--detect", "none"]) == 1
    assert "same file" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_prepare_replaces_its_index_files_as_a_set(tmp_path: Path, monkeypatch, capsys) -> None:
    """A kill after the first of the three files used to leave new ids beside old labels (check-data: 0 errors)."""
    from test_prepare import write_rafdb_official

    import ceprompt.core.io_utils as io_utils

    src, dst = tmp_path / "raw", tmp_path / "prepared"
    write_rafdb_official(src)
    assert main(["prepare", "rafdb", str(src), str(dst), "--skip-bad-rows"]) == 0
    real = io_utils.os.replace
    renamed: list[str] = []

    def killed_after_the_first(a, b):
        if renamed:
            raise KeyboardInterrupt  # a kill between two renames
        renamed.append(str(b))
        return real(a, b)

    monkeypatch.setattr(io_utils.os, "replace", killed_after_the_first)
    assert main(["prepare", "rafdb", str(src), str(dst), "--overwrite", "--skip-bad-rows"]) == 130
    monkeypatch.undo()
    assert renamed  # one file of the set was replaced, the others not
    assert main(["check-data", str(dst), "--dataset", "rafdb", "--image-dir", "Image/aligned"]) == 1
    assert "`ceprompt prepare` was interrupted" in capsys.readouterr().err
    assert main(["prepare", "rafdb", str(src), str(dst), "--overwrite", "--skip-bad-rows"]) == 0
    assert main(["check-data", str(dst), "--dataset", "rafdb", "--image-dir", "Image/aligned"]) == 0


def test_an_interrupted_hub_export_says_so_and_the_next_export_clears_its_leftovers(runs, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import ceprompt.core.io_utils as io_utils

    folder = tmp_path / "hub"
    assert main(["export", "hub", str(runs["s2"]), str(folder)]) == 0
    real = io_utils.os.replace

    def killed_at_the_last_rename(a, b):
        if Path(b).name == "config.json":
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(io_utils.os, "replace", killed_at_the_last_rename)
    assert main(["export", "hub", str(runs["s2"]), str(folder), "--overwrite"]) == 130
    monkeypatch.undo()
    (folder / ".model.safetensors.0badc0de.tmp").write_bytes(b"half")  # what a SIGKILL leaves
    with pytest.raises(CepromptError, match="export hub` into this folder was interrupted"):
        ceprompt.load(folder, device="cpu")
    assert main(["export", "hub", str(runs["s2"]), str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    ceprompt.load(folder, device="cpu")


# --- failures contained to their own file ----------------------------------------------------------------

def test_any_decoder_exception_is_that_files_row_and_the_run_goes_on(runs, tmp_path: Path, monkeypatch) -> None:
    """Mutated AVIF files made the decoder raise RuntimeError ("Decoding of color planes failed"), which aborted
    the whole run; any exception a decoder raises is now the file's own error."""
    from PIL import PngImagePlugin

    photos = tmp_path / "photos"
    photos.mkdir()
    gradient(64, 1).save(photos / "a_good.png")
    gradient(64, 2).save(photos / "b_bad.png")
    real = PngImagePlugin.PngImageFile.load

    def decoder_fails(self):
        if str(getattr(self, "filename", "")).endswith("b_bad.png"):
            raise RuntimeError("Decoding of color planes failed")
        return real(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoder_fails)
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s1"]), str(photos), "--detect", "none", "-o", str(out), "--no-progress"]) == 1
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert rows["a_good.png"]["label"] and not rows["a_good.png"]["error"]
    assert "Decoding of color planes failed" in rows["b_bad.png"]["error"]


def test_a_tracker_that_fails_after_it_started_costs_a_warning_not_the_run(tmp_path: Path, monkeypatch,
                                                                           caplog) -> None:
    import logging

    import ceprompt.engine.reporting as reporting

    calls: list[str] = []

    class RefusesMetrics:  # an MLflow server that accepted the run, then refuses every metric
        def __init__(self, run_dir, cfg) -> None:
            calls.append("open")

        def scalars(self, values, step) -> None:
            calls.append("scalars")
            raise ConnectionError("503 Service Unavailable")

        def final(self, metrics, picture) -> None:
            calls.append("final")

        def close(self) -> None:
            calls.append("close")

    monkeypatch.setitem(reporting.OPENERS, "tensorboard", RefusesMetrics)
    data = write_three_file_dataset(tmp_path / "RAF-DB", "rafdb", n_train=2, n_test=1)
    with caplog.at_level(logging.WARNING, logger="ceprompt"):
        result = ceprompt.train("rafdb_stage1", data__root=data, backbone__arch="tiny-vit", data__workers=0,
                                optim__epochs=2, optim__batch_size=7, optim__warmup_epochs=0,
                                run__output_dir=tmp_path, run__name="t", run__device="cpu", run__progress=False,
                                run__log_to=["tensorboard"])
    assert result.checkpoint.is_file() and calls == ["open", "scalars"]  # dropped at its first failure
    assert sum("tensorboard failed (503 Service Unavailable)" in r.getMessage() for r in caplog.records) == 1


def test_an_unreachable_mlflow_server_is_asked_briefly_then_left(tmp_path: Path, monkeypatch, caplog) -> None:
    import logging
    import socket

    pytest.importorskip("mlflow")
    from ceprompt.engine.reporting import open_trackers
    from ceprompt.experiment.config import Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with caplog.at_level(logging.WARNING, logger="ceprompt"):
        assert open_trackers(["mlflow"], tmp_path, Config()) == []
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # mlflow's own default retries for minutes
    assert any("mlflow could not start" in r.getMessage() for r in caplog.records)


# --- every file read back checked: resume state ------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "epoch": -5}, "epoch=-5; expected a number in [1, 100000]"),
    (lambda s: {k: v for k, v in s.items() if k != "model"}, "model is missing"),
    (lambda s: [s], "expected a mapping of saved values, found list"),
    (lambda s: {**s, "epoch": "3"}, "epoch='3'; expected int"),
    (lambda s: {**s, "epoch": 10**9}, "epoch=1000000000; expected a number in [1, 100000]"),
    (lambda s: {**s, "epoch": 7}, "saved after epoch 7, but this run has optim.epochs=1"),
    (lambda s: {**s, "model": {"visual.x": "not a tensor"}}, "which is not a named tensor"),
])
def test_a_crafted_resume_state_is_one_line_and_changes_nothing(runs, tmp_path: Path, capsys, edit,
                                                                message) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["s1"], run)
    state = torch.load(run / "resume.pt", weights_only=True)
    torch.save(edit(state), run / "resume.pt")
    best = run / "checkpoints" / "best.safetensors"
    before = best.read_bytes()
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert best.read_bytes() == before


def test_recorded_paths_are_tried_in_order_until_one_verifies(runs, tmp_path: Path) -> None:
    """A stage-2 run copied beside a different stage-1 run: its relative path finds the wrong file first, and its
    recorded absolute path still holds the right one."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(runs["s2"], other / runs["s2"].name)
    stage1 = other / runs["s1"].name / "checkpoints"
    stage1.mkdir(parents=True)
    shutil.copy(runs["s1"] / "checkpoints" / "best.safetensors", stage1 / "best.safetensors")
    with open(stage1 / "best.safetensors", "ab") as fh:
        fh.write(b" ")  # another stage-1 file where the relative path points
    face = gradient(64, 3)
    moved = ceprompt.load(other / runs["s2"].name, device="cpu").predict(face, detect="none")[0]
    original = ceprompt.load(runs["s2"], device="cpu").predict(face, detect="none")[0]
    assert moved.probabilities == original.probabilities


# --- class names as the model reads them ------------------------------------------------------------------

@pytest.mark.parametrize("classes", ["ｈａｐｐｙ,happy", "&#104;appy,happy", "ﬁerce,fierce", "Happy,HAPPY_"])
def test_names_the_tokenizer_reads_alike_are_one_class(runs, classes: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(runs["s1"]), "nothing.png", "--classes", classes])
    assert exit_info.value.code == 2 and "are the same class" in capsys.readouterr().err
    with pytest.raises(CepromptError, match="are the same class"):
        ceprompt.load(runs["s1"], device="cpu", classes=classes.split(","))


def test_a_malformed_class_alias_is_refused_by_predict_serve_and_the_api(runs, capsys) -> None:
    for verb in (["predict", str(runs["s1"]), "x.png"], ["serve", str(runs["s1"])]):
        with pytest.raises(SystemExit) as exit_info:
            main([*verb, "--class-alias", "a==b"])
        assert exit_info.value.code == 2 and "expected ALIAS=CLASS" in capsys.readouterr().err
    with pytest.raises(CepromptError, match="expected ALIAS=CLASS"):
        ceprompt.load(runs["s1"], device="cpu", class_aliases=["a==b"])


def test_a_class_name_too_long_for_the_prompt_is_blamed_and_not_echoed_whole(runs) -> None:
    name = "very" * 500
    with pytest.raises(CepromptError) as info:
        ceprompt.load(runs["s2"], device="cpu", classes=["happy", name])
    message = str(info.value)
    assert "Shorten the class name" in message and "ctx_init" not in message and len(message) < 400


# --- degenerate images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 64, 3), np.uint8),
                                   Image.new("RGB", (0, 0)), Image.fromarray(np.full((32, 32), np.nan, np.float32))],
                         ids=["0x0 array", "0x64 array", "0x0 PIL", "all-NaN F image"])
def test_degenerate_images_are_refused_in_one_line_by_predict_embed_and_explain(runs, image) -> None:
    rec = ceprompt.load(runs["s1"], device="cpu")
    for call in (lambda: rec.predict(image, detect="none"), lambda: rec.embed(image, detect="none"),
                 lambda: rec.explain(image, detect="none")):
        with pytest.raises(CepromptError) as info:
            call()
        assert len(str(info.value).splitlines()) == 1 and ("pixel" in str(info.value) or "empty" in str(info.value))


def test_embed_streams_batches_instead_of_holding_every_crop(runs, tmp_path: Path, monkeypatch) -> None:
    """0.3.0 cut every face of every input before the first forward pass (15 GB per 100k faces at 224 px)."""
    import ceprompt.api as api

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        gradient(64, i).save(photos / f"{i:02d}.png")
    events: list[str] = []
    real_open, real_forward = api.open_image, api.Recognizer._forward
    monkeypatch.setattr(api, "open_image", lambda *a, **k: events.append("open") or real_open(*a, **k))
    monkeypatch.setattr(api.Recognizer, "_forward", lambda self, crops: events.append(f"forward {len(crops)}")
                        or real_forward(self, crops))
    out = tmp_path / "feats.npz"
    assert main(["embed", str(runs["s1"]), str(photos), "-o", str(out), "--detect", "none", "--batch-size", "4",
                 "--no-progress"]) == 0
    assert np.load(out)["embeddings"].shape[0] == 12
    forwards = [i for i, e in enumerate(events) if e.startswith("forward")]
    opens = [i for i, e in enumerate(events) if e == "open"]
    assert [events[i] for i in forwards] == ["forward 4"] * 3 and forwards[0] < opens[-1]
