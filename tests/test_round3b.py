"""Hostile and careless use, third round, part 2 (issue 35): sizes declared in files and streams bounded as a
whole, duplicate classes refused wherever classes come from, per-file errors for every per-file failure, NaN never
written as a result, outputs claimed by one run, a full disk one line."""

from __future__ import annotations

import io
import json
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ceprompt
from ceprompt.cli import main
from ceprompt.core.errors import CepromptError, CheckpointError, DataError

from helpers import class_image, rows_of, train_tiny_runs, write_folder_dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("round3b"))



def face(tmp_path: Path) -> Path:
    path = tmp_path / "face.png"
    class_image(3, 7, seed=1, size=64).save(path)
    return path


# --- sizes bounded as a whole ----------------------------------------------------------------------------

def test_zip_entries_are_summed_against_one_budget(runs, tmp_path: Path, capsys) -> None:
    """24 compressed entries of 4 MiB each pass a per-entry check and inflate to 96 MiB together."""
    bomb = tmp_path / "many.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("many/data.pkl", b"\x80\x02}q\x00.")
        for i in range(24):
            archive.writestr(f"many/data/{i}", bytes(4 << 20))
    assert bomb.stat().st_size < 1 << 20
    assert main(["convert", str(bomb), str(tmp_path / "x.safetensors")]) == 1
    assert "no more than 64 MiB compressed is inflated" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(runs["s1"], run)
    shutil.copy(bomb, run / "resume.pt")
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compressed entries declare" in err[0]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["preprocess"].update(image_size=40000), "preprocess.image_size"),
    (lambda c: c["clip_spec"].update(image_size=40000), "clip_spec.image_size"),
    (lambda c: c.update(class_names=[f"c{i}" for i in range(20000)], prompt_names=[f"c{i}" for i in range(20000)]),
     "2 to 1000 distinct"),
])
def test_sizes_a_model_folder_declares_are_bounded_and_checked_against_the_model(runs, tmp_path: Path, edit,
                                                                                   message) -> None:
    folder = tmp_path / "hub"
    assert main(["export", "hub", str(runs["s1"]), str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        ceprompt.load(folder, device="cpu")


def test_ten_thousand_classes_are_refused_before_the_text_tower_runs(runs, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["predict", str(runs["s1"]), "x.png", "--classes", ",".join(f"c{i}" for i in range(10000))])
    assert "10,000 classes; at most 1,000" in capsys.readouterr().err


def test_every_decoded_video_frame_obeys_the_pixel_limit(runs, tmp_path: Path) -> None:
    """The header says 64x64; at frame 6 the stream switches to 2048x2048 (a raw H.264 stream may)."""
    import av

    def segment(size: tuple[int, int], n: int) -> bytes:
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            for i in range(n):
                frame = av.VideoFrame.from_image(Image.new("RGB", size, (120, 110, 100)))
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buf.getvalue()

    video = tmp_path / "switch.mp4"  # MPEG-TS inside: the decoder goes by content
    video.write_bytes(segment((64, 64), 6) + segment((2048, 2048), 2))
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s1"]), str(video), "--detect", "none", "--video-stride", "1", "-o", str(out),
                 "--max-pixels", "1000000", "--no-progress"]) == 1
    rows = rows_of(out)
    assert [r["frame"] for r in rows if r["label"]] == ["0", "1", "2", "3", "4", "5"]
    assert "frame 6 is 2048x2048" in rows[-1]["error"] and "changed size" in rows[-1]["error"]


def test_the_paired_bootstrap_memory_is_a_few_copies_of_the_input_not_one_per_resample() -> None:
    from ceprompt.engine.significance import bootstrap_difference

    n = 1_000_000
    rng = np.random.default_rng(0)
    a, b = rng.random(n) < 0.8, rng.random(n) < 0.78
    tracemalloc.start()
    result = bootstrap_difference(a, b, samples=2000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 8 * n  # a few float copies of the input; drawing 2000 x n indices took 16 GB here
    assert result["ci_low"] < result["difference"] < result["ci_high"]


# --- real inputs handled as users expect -----------------------------------------------------------------

@pytest.mark.parametrize("folders", [["Happy", "happy", "sad"], ["happy face", "happy_face", "sad"],
                                     ["joy", "happy", "sad"]])
def test_class_folders_that_are_one_class_are_refused(tmp_path: Path, folders: list[str]) -> None:
    root = write_folder_dataset(tmp_path / "faces", folders, n_train=2, n_test=1)
    with pytest.raises(DataError, match="are the same class"):
        ceprompt.train("rafdb_stage1", data__dataset="folder", data__root=root, backbone__arch="tiny-vit",
                       run__output_dir=tmp_path / "runs", run__device="cpu", data__workers=0, run__progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_file_name_too_long_for_the_file_system_is_that_files_row(runs, tmp_path: Path) -> None:
    good = face(tmp_path)
    long_name = tmp_path / ("a" * 300 + ".png")
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s1"]), str(good), str(long_name), "--detect", "none", "-o", str(out),
                 "--no-progress"]) == 1
    rows = rows_of(out)
    assert rows[0]["label"] and "too long" in rows[1]["error"].lower()


def test_scores_that_are_not_finite_are_errors_never_results(runs, tmp_path: Path) -> None:
    rec = ceprompt.load(runs["s1"], device="cpu", precision="fp32")
    with torch.no_grad():
        rec.model.clip.visual.ln_post.weight.mul_(1e38)  # finite but extreme weights: the features overflow
    image = Image.open(face(tmp_path))
    with pytest.raises(CepromptError, match="not finite"):
        rec.predict(image, detect="none")
    with pytest.raises(CepromptError, match="not finite"):
        rec.explain(image, detect="none")


# --- outputs and configs ---------------------------------------------------------------------------------

def test_an_output_another_run_is_writing_is_refused(runs, tmp_path: Path, capsys) -> None:
    from ceprompt.core.outputs import OutputFile

    out = tmp_path / "same.csv"
    with OutputFile(out):  # the first run holds its output from its check to its rename
        assert main(["predict", str(runs["s1"]), str(face(tmp_path)), "--detect", "none", "-o", str(out)]) == 1
        assert "another" in capsys.readouterr().err.lower() or "held" in capsys.readouterr().err.lower()
    assert main(["predict", str(runs["s1"]), str(face(tmp_path)), "--detect", "none", "-o", str(out),
                 "--no-progress"]) == 0


def test_a_full_disk_is_one_line_for_export_hub_and_leaves_no_truncated_picture(runs, tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["export", "hub", str(runs["s1"]), str(tmp_path / "hub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not [p for p in (tmp_path / "hub").iterdir()] if (tmp_path / "hub").exists() else True
    monkeypatch.undo()

    import matplotlib.figure

    from ceprompt.engine.plots import plot_confusion

    real = matplotlib.figure.Figure.savefig

    def half_written(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    picture = tmp_path / "cm.png"
    with pytest.raises(OSError):
        plot_confusion(np.eye(3, dtype=int) * 5, ["a", "b", "c"], picture)
    assert not picture.exists() and not list(tmp_path.glob(".cm.png*"))
