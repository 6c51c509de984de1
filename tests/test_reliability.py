"""Bad input, interrupted runs and untrusted files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from ceprompt.cli import main
from ceprompt.core.config import parse_override
from ceprompt.core.errors import CheckpointError, ConfigError, DataError
from ceprompt.data.three_files import Problems, read_index, read_pairs
from ceprompt.experiment.config import load_config
from ceprompt.weights.checkpoint import read_checkpoint

from helpers import quick_train_sets, write_three_file_dataset

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tiny_args(tmp_path: Path, data: Path, name: str, *extra: str) -> list[str]:
    return ["--config", "rafdb_stage1", *quick_train_sets(data, tmp_path / "runs", name, "backbone.arch=tiny-vit",
                                                          "cat.prompt_depth=3", *extra, epochs=2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_three_file_dataset(tmp_path_factory.mktemp("rel") / "RAF-DB", "rafdb", n_train=2, n_test=1)


# --- check-data -------------------------------------------------------------------------------------


def test_check_data_reports_everything_at_once(tmp_path: Path, capsys) -> None:
    root = write_three_file_dataset(tmp_path / "raf", "rafdb", 2, 1)
    info = root / "EmoLabel"
    with open(info / "image_class_labels.txt", "a") as fh:
        fh.write("3 4\n")  # duplicate id, line 22
    with open(info / "train_test_split.txt", "a") as fh:
        fh.write("500 1\n")  # id nowhere else
    images = root / "Image" / "aligned_224"
    (images / "train_00001_aligned.jpg").write_bytes(b"garbage")
    (images / "train_00002_aligned.jpg").unlink()
    Image.new("L", (20, 40)).save(images / "train_00003_aligned.jpg", format="PNG")  # grey, small, oblong
    report_json = tmp_path / "report.json"
    assert main(["check-data", str(root), "--dataset", "rafdb", "--json", str(report_json)]) == 1
    out = capsys.readouterr().out
    assert "image_class_labels.txt:22: duplicate id '3' (first on line 3)" in out
    assert "train_test_split.txt:22: id '500' is missing from images.txt and image_class_labels.txt" in out
    assert "train_00001_aligned.jpg: unreadable image" in out and "train_00002_aligned.jpg: missing image file" in out
    assert "4 errors" in out
    assert "1 image(s) in mode L" in out and "smaller than 32 px" in out and "from square" in out
    report = json.loads(report_json.read_text())
    assert report["ok"] is False and report["counts"]["train"]["surprise"] == 2
    clean = write_three_file_dataset(tmp_path / "clean", "rafdb", 1, 1)
    assert main(["check-data", str(clean), "--dataset", "rafdb", "--full"]) == 0


def test_training_refuses_bad_images_unless_skipping(tmp_path: Path, capsys) -> None:
    root = write_three_file_dataset(tmp_path / "raf", "rafdb", 2, 1)
    (root / "Image" / "aligned_224" / "train_00001_aligned.jpg").write_bytes(b"garbage")
    assert main(["train", *tiny_args(tmp_path, root, "refused", "optim.epochs=1")]) == 1
    err = capsys.readouterr().err
    assert "train_00001_aligned.jpg: unreadable image" in err and "--skip-bad-images" in err
    assert main(["train", *tiny_args(tmp_path, root, "skipping", "optim.epochs=1"), "--skip-bad-images"]) == 0
    skipped = (tmp_path / "runs" / "skipping" / "skipped_images.txt").read_text()
    assert "train_00001_aligned.jpg: unreadable image" in skipped


# --- parsers never fail in unexpected ways ----------------------------------------------------------


@FAST
@given(files=st.tuples(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300)))
def test_three_file_parser_on_arbitrary_bytes(tmp_path: Path, files) -> None:
    for name, content in zip(("images.txt", "image_class_labels.txt", "train_test_split.txt"), files):
        (tmp_path / name).write_bytes(content)
    try:
        records = read_index(tmp_path)
    except DataError:
        return
    assert all(r.is_train in (True, False) and isinstance(r.label, int) for r in records)


line = st.text(alphabet=st.sampled_from(list("0123 \t-x.jpg\u00e9#1\r")), max_size=12)


@FAST
@given(rows=st.lists(st.tuples(line, line, line), max_size=12))
def test_three_file_parser_on_arbitrary_lines(tmp_path: Path, rows) -> None:
    for i, name in enumerate(("images.txt", "image_class_labels.txt", "train_test_split.txt")):
        (tmp_path / name).write_text("\n".join(r[i] for r in rows), encoding="utf-8")
    problems = Problems()
    records = read_index(tmp_path, problems=problems)
    if not problems:  # consistent files give one record per id, with its own values
        assert len(records) == len(read_pairs(tmp_path / "images.txt", Problems()))
    else:  # and every problem names its file
        assert all(p.startswith(str(tmp_path)) for p in problems.items)


@FAST
@given(content=st.binary(max_size=400))
def test_config_file_on_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError:
        pass


yaml_ish = st.text(alphabet=st.sampled_from(list("abcdeoptim.lr=1e-4[]{}:,'\"- \n!&*|>%@`0")), max_size=40)


@FAST
@given(text=st.one_of(yaml_ish, st.text(max_size=40)))
def test_config_overrides_on_arbitrary_text(text: str) -> None:
    try:
        load_config(None, [text])
    except ConfigError:
        pass
    try:
        assert isinstance(parse_override(text), dict)
    except ConfigError:
        pass


@FAST
@given(section=st.sampled_from(["optim", "data", "head", "cat", "eva", "run", "backbone"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                          max_size=2)))
def test_config_values_of_any_type(tmp_path: Path, section: str, value) -> None:
    import yaml

    from ceprompt.experiment.config import Config

    for key in getattr(Config(), section).__dict__:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({section: {key: value}}))
        try:
            load_config(path)
        except ConfigError:
            pass


# --- interrupted runs -------------------------------------------------------------------------------

KILL_DURING_WRITE = """
import os, pathlib, sys, time
import ceprompt.core.io_utils as io_utils
from ceprompt.cli import main
real_replace, seen = os.replace, []
def replace(src, dst):
    if str(dst).endswith("last.safetensors"):
        seen.append(dst)
        if len(seen) == 2:  # epoch 2's checkpoint: announce, then hang mid-write until killed
            pathlib.Path(sys.argv[1]).write_text("writing")
            time.sleep(600)
    real_replace(src, dst)
io_utils.os.replace = replace
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes(tmp_path: Path, data: Path) -> None:
    marker = tmp_path / "marker"
    args = ["train", *tiny_args(tmp_path, data, "killed", "optim.epochs=3")]
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_WRITE, str(marker), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = tmp_path / "runs" / "killed"
    assert list((run / "checkpoints").glob(".last.safetensors.*.tmp"))  # the half-written file
    _, meta, _ = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 1  # the previous checkpoint, intact and loadable
    assert torch.load(run / "resume.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--resume", str(run)]) == 0
    _, meta, _ = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 3 and not list((run / "checkpoints").glob(".*.tmp"))
    assert [int(r.split(",")[0]) for r in (run / "summary.csv").read_text().splitlines()[1:]] == [1, 2, 3]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, data: Path, capsys,
                                                               monkeypatch) -> None:
    import ceprompt.model.eva

    assert main(["train", *tiny_args(tmp_path, data, "nan", "optim.epochs=1")]) == 0
    run = tmp_path / "runs" / "nan"
    before = {p.name: p.read_bytes() for p in [*run.glob("checkpoints/*"), run / "resume.pt", run / "config.yaml"]}
    capsys.readouterr()
    real = ceprompt.model.eva.emotion_scores
    monkeypatch.setattr(ceprompt.model.eva, "emotion_scores", lambda *a: real(*a) * float("nan"))  # a diverged model
    assert main(["train", "--resume", str(run), "--set", "optim.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, batch" in err and "optimiser step" in err
    after = {p.name: p.read_bytes() for p in [*run.glob("checkpoints/*"), run / "resume.pt", run / "config.yaml"]}
    assert after == before


def test_resume_refuses_a_changed_model(tmp_path: Path, data: Path, capsys) -> None:
    assert main(["train", *tiny_args(tmp_path, data, "changed", "optim.epochs=1")]) == 0
    run = tmp_path / "runs" / "changed"
    config = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--set", "eva.fix_layer=3", "--set", "optim.epochs=2"]) == 1
    assert "eva.fix_layer=2 in the saved state, 3 now" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config


# --- output folders ---------------------------------------------------------------------------------


def test_unwritable_output_folder_is_reported_before_training(tmp_path: Path, data: Path, capsys) -> None:
    args = tiny_args(tmp_path, data, "x", "run.output_dir=/sys/ceprompt-runs")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "/sys/ceprompt-runs/x: cannot write the run directory" in err


def test_full_disk_is_reported_before_training(tmp_path: Path, data: Path, capsys, monkeypatch) -> None:
    import shutil

    from ceprompt.engine import run_dir as train_module

    monkeypatch.setattr(train_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1 << 20))
    assert main(["train", *tiny_args(tmp_path, data, "full")]) == 1
    assert "only 1 MiB free; checkpoints need about" in capsys.readouterr().err
    assert not list((tmp_path / "runs" / "full").glob("checkpoints/*"))


# --- untrusted and mismatched checkpoints -----------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_resume_state_with_code_is_refused(tmp_path: Path, data: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_args(tmp_path, data, "evil", "optim.epochs=1")]) == 0
    run = tmp_path / "runs" / "evil"
    state = torch.load(run / "resume.pt", weights_only=True)
    state["optimizer"]["payload"] = _Payload()
    torch.save(state, run / "resume.pt")
    assert main(["train", "--resume", str(run), "--set", "optim.epochs=2"]) == 1
    assert "cannot read resume state" in capsys.readouterr().err
    assert not (tmp_path / "pwned.txt").exists()


def test_mismatched_checkpoints_are_refused(tmp_path: Path, data: Path, capsys) -> None:
    assert main(["train", *tiny_args(tmp_path, data, "s1", "optim.epochs=1")]) == 0
    run = tmp_path / "runs" / "s1"
    # another backbone for stage 2
    other = ["--set", "backbone.arch=tiny-vit-12", "--set", "backbone.seed=3"]
    from ceprompt.model.clip import build_clip, get_arch
    from ceprompt.weights.clip_files import save_clip_safetensors

    save_clip_safetensors(build_clip("tiny-vit-12", seed=3), get_arch("tiny-vit-12"), tmp_path / "other.safetensors")
    capsys.readouterr()
    code = main(["train", *tiny_args(tmp_path, data, "s2", "optim.epochs=1"), "--init", str(run),
                 "--set", "stage=cat", "--clip", str(tmp_path / "other.safetensors"), *other])
    assert code == 1
    err = capsys.readouterr().err
    assert "was trained on another backbone" in err and "vision_layers: 4 vs 12" in err
    # evaluating on a dataset with other classes
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(folder / split / c / "x.png")
    # (classes it was not trained for are scored from their words since issue 22, and marked unseen)
    assert main(["eval", "--checkpoint", str(run), "--data", str(folder), "--dataset", "folder", "--out",
                 str(tmp_path / "ev")]) == 0
    assert [c["seen"] for c in json.loads((tmp_path / "ev" / "metrics.json").read_text())["classes"]] == [False, False]
    # weights that do not match their own description (e.g. edited by hand)
    weights = load_file(run / "checkpoints" / "best.safetensors")
    _, meta, _ = read_checkpoint(run)
    from ceprompt.weights.checkpoint import save_checkpoint

    weights.pop(next(iter(weights)))
    save_checkpoint(tmp_path / "edited.safetensors", weights, meta)
    with pytest.raises(CheckpointError, match="saved weights do not match this model"):
        from ceprompt.weights.build import load_trained

        load_trained(tmp_path / "edited.safetensors")
    # plain CLIP weights given where a trained checkpoint is expected
    with pytest.raises(CheckpointError, match="no ceprompt description"):
        read_checkpoint(tmp_path / "other.safetensors")
