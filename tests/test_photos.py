"""The photo files people really have: rotated phone pictures, 16-bit PNGs, thumbnails, huge or truncated
images, odd file names, FIFOs, index paths that leave the dataset, videos (issue 13, section 4)."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import ceprompt
from ceprompt.cli import main
from ceprompt.data.images import ImageError, open_image, probe_image

from helpers import rows_of, train_tiny_runs, write_three_file_dataset

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("photos"))


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (the pixel data is a stub)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))



def with_orientation(image: Image.Image, orientation: int) -> bytes:
    """``image`` stored the way a phone does: pixels turned, EXIF Orientation saying how to turn them back."""
    stored = {6: image.transpose(Image.Transpose.ROTATE_90), 8: image.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).size == image.size  # the premise
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied_and_boxes_are_upright(runs, tmp_path: Path, orientation: int) -> None:
    pytest.importorskip("facenet_pytorch")
    upright = Image.fromarray(skimage_data.astronaut())
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(with_orientation(upright, orientation))
    rec = ceprompt.load(runs["s2"], device="cpu")
    reference = rec.predict(upright)[0]
    faces = rec.predict(photo)
    assert len(faces) == 1
    assert np.allclose(faces[0].box, reference.box, atol=12)  # the same face, in the upright frame
    assert open_image(photo).size == upright.size


def test_sixteen_bit_pngs_are_scaled_not_clipped(runs, tmp_path: Path) -> None:
    grey8 = np.asarray(Image.fromarray(skimage_data.astronaut()).convert("L"), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey8 * 257).save(path)  # the same picture with 16 bits per pixel
    assert Image.open(path).mode.startswith("I")
    opened = np.asarray(open_image(path).convert("L"), dtype=np.int32)
    assert np.abs(opened - grey8).max() <= 1 and (opened == 255).mean() < 0.05
    pytest.importorskip("facenet_pytorch")
    assert len(ceprompt.load(runs["s2"], device="cpu").predict(path)) == 1


def test_a_thumbnail_is_its_own_row_and_loses_no_other_rows(runs, tmp_path: Path) -> None:
    pytest.importorskip("facenet_pytorch")
    folder = tmp_path / "photos"
    folder.mkdir()
    face = Image.fromarray(skimage_data.astronaut())
    for i in range(3):
        face.save(folder / f"good{i}.png")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    Image.new("RGB", (1, 400)).save(folder / "sliver.png")
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s2"]), str(folder), "-o", str(out), "--no-progress"]) == 0
    by_name = {Path(r["path"]).name: r for r in rows_of(out)}
    assert set(by_name) == {"good0.png", "good1.png", "good2.png", "tiny.png", "sliver.png"}
    assert all(by_name[f"good{i}.png"]["label"] for i in range(3))
    assert by_name["tiny.png"]["face"] == "" and by_name["tiny.png"]["error"] == ""


def test_one_pixel_limit_from_the_header_everywhere(runs, tmp_path: Path, capsys) -> None:
    bombs = {"huge.png": declared_png(30000, 30000), "big.png": declared_png(10000, 10000)}
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        assert len(data) < 1000
        with pytest.raises(ImageError, match="pixels, over the limit|safety limit"):
            open_image(tmp_path / name)
        assert "over the limit" in probe_image(tmp_path / name).problem or "safety" in probe_image(tmp_path / name).problem
    # predict: a row with the error per file, the run goes on
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "ok.png")
    out = tmp_path / "out.csv"
    code = main(["predict", str(runs["s1"]), *(str(tmp_path / n) for n in ("huge.png", "big.png", "ok.png")),
                 "-o", str(out), "--detect", "none", "--no-progress"])
    assert code == 1
    by_name = {Path(r["path"]).name: r for r in rows_of(out)}
    assert "over the limit of 50,000,000" in by_name["big.png"]["error"] and by_name["ok.png"]["label"]
    assert by_name["huge.png"]["error"]
    # the limit is configurable
    assert main(["predict", str(runs["s1"]), str(tmp_path / "ok.png"), "--detect", "none", "--no-progress",
                 "--max-pixels", "1000"]) == 1
    assert "over the limit of 1,000" in capsys.readouterr().out
    # datasets: check-data reports it, training skips it with --skip-bad-images
    data = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=2, n_test=1)
    (data / "Image" / "aligned_224" / "train_00001_aligned.jpg").write_bytes(bombs["huge.png"])
    (data / "Image" / "aligned_224" / "train_00002_aligned.jpg").write_bytes(bombs["big.png"])
    capsys.readouterr()
    assert main(["check-data", str(data), "--dataset", "rafdb"]) == 1
    assert "train_00002_aligned.jpg: 10000x10000 is 100,000,000 pixels, over the limit" in capsys.readouterr().out
    args = ["--set", "backbone.arch=tiny-vit", "--set", f"data.root={data}", "--set", "data.workers=0",
            "--set", "optim.epochs=1", "--set", "optim.batch_size=7", "--set", "optim.warmup_epochs=0",
            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.device=cpu", "--set", "head.top_k=4",
            "--set", "run.progress=false"]
    assert main(["train", "--config", "rafdb_stage1", *args, "--name", "bombs", "--skip-bad-images"]) == 0
    skipped = (tmp_path / "runs" / "bombs" / "skipped_images.txt").read_text()
    assert "train_00001_aligned.jpg" in skipped and "train_00002_aligned.jpg" in skipped


def test_skip_bad_images_skips_truncated_jpegs(tmp_path: Path) -> None:
    data = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=2, n_test=1, size=64)
    target = data / "Image" / "aligned_224" / "train_00001_aligned.jpg"
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    target.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, pixels cut off
    assert probe_image(target).problem is None  # a header check cannot see it ...
    assert "truncated" in probe_image(target, full=True).problem  # ... decoding every pixel does
    args = ["--set", "backbone.arch=tiny-vit", "--set", f"data.root={data}", "--set", "data.workers=0",
            "--set", "optim.epochs=1", "--set", "optim.batch_size=7", "--set", "optim.warmup_epochs=0",
            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.device=cpu", "--set", "head.top_k=4",
            "--set", "run.progress=false"]
    assert main(["train", "--config", "rafdb_stage1", *args, "--name", "t", "--skip-bad-images"]) == 0
    assert "train_00001_aligned.jpg" in (tmp_path / "runs" / "t" / "skipped_images.txt").read_text()


def test_odd_file_names(runs, tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    face = Image.fromarray(skimage_data.astronaut()).resize((96, 96))
    raw_name = os.fsdecode(b"caf\xe9-latin1.png")  # not UTF-8: kept by Python as a surrogate
    face.save(folder / raw_name)
    long_name = "x" * 251 + ".png"
    face.save(folder / long_name)
    face.save(folder / "zz-last.png")
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s1"]), str(folder), "-o", str(out), "--detect", "none",
                 "--annotate", str(tmp_path / "ann"), "--no-progress"]) == 0
    names = [Path(r["path"]).name for r in rows_of(out)]
    assert raw_name in names and long_name in names and "zz-last.png" in names
    assert os.fsencode(raw_name) in out.read_bytes()  # the file's own bytes, so the row leads back to it
    annotated = list((tmp_path / "ann").iterdir())
    assert len(annotated) == 3 and all(len(os.fsencode(p.name)) < 200 for p in annotated)


def test_a_fifo_in_a_dataset_does_not_hang(tmp_path: Path) -> None:
    data = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=2, n_test=1)
    target = data / "Image" / "aligned_224" / "train_00001_aligned.jpg"
    target.unlink()
    os.mkfifo(target)
    proc = subprocess.run([sys.executable, "-m", "ceprompt", "check-data", str(data), "--dataset", "rafdb"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "train_00001_aligned.jpg: not a regular file" in proc.stdout


def test_index_paths_that_leave_the_root_are_refused_unless_allowed(tmp_path: Path, capsys) -> None:
    data = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=2, n_test=1)
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (24, 24)).save(outside, format="JPEG")
    images = data / "EmoLabel" / "images.txt"
    lines = images.read_text().splitlines()
    lines[0] = "1 ../../../secret.jpg"
    lines[1] = f"2 {outside}"
    images.write_text("\n".join(lines) + "\n")
    assert main(["check-data", str(data), "--dataset", "rafdb"]) == 1
    out = capsys.readouterr().out
    assert "2 image path(s) are absolute or leave the image folder" in out and "--allow-outside-root" in out
    assert main(["check-data", str(data), "--dataset", "rafdb", "--allow-outside-root"]) == 0


def make_video(path: Path, frames: list[Image.Image], rate: int, codec: str = "mpeg4") -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_videos_keep_their_rate_and_container_and_a_faceless_one_has_a_row(runs, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    pytest.importorskip("facenet_pytorch")
    grey = [Image.new("RGB", (96, 64), (90 + i, 90, 90)) for i in range(6)]
    clip = make_video(tmp_path / "talk.mov", grey, rate=30)
    out = tmp_path / "out.csv"
    assert main(["predict", str(runs["s2"]), str(clip), "-o", str(out), "--video-stride", "2",
                 "--annotate", str(tmp_path / "ann"), "--no-progress"]) == 0
    rows = rows_of(out)
    assert len(rows) == 1 and rows[0]["face"] == "" and rows[0]["error"] == ""
    written = list((tmp_path / "ann").iterdir())
    assert [p.suffix for p in written] == [".mov"]
    with av.open(str(written[0])) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 30 and sum(1 for _ in container.decode(video=0)) == 6


def test_prepare_align_confines_output_paths(tmp_path: Path, capsys) -> None:
    src = tmp_path / "RAF-DB"
    (src / "EmoLabel").mkdir(parents=True)
    (src / "Image" / "original").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(src / "Image" / "original" / "train_00001.jpg")
    (src / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 1\ntrain_/../../../../escape.jpg 2\n")
    assert main(["prepare", "rafdb", str(src), str(tmp_path / "out"), "--align", "--no-progress"]) == 1
    assert "is a path; expected a file name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape*"))
