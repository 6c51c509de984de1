"""Hostile and careless inputs, second round (issue 20): no external decoder ever runs, a server that bounds memory
and connections, files read back validated before they cost anything, outputs that replace nothing, results that
would look fine and be wrong."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ceprompt
from ceprompt.cli import main
from ceprompt.core.errors import CepromptError, CheckpointError
from ceprompt.model.clip import build_clip, get_arch
from ceprompt.weights.checkpoint import read_checkpoint

from helpers import rows_of, train_tiny_runs, write_folder_dataset, write_three_file_dataset

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
       b"newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("hostile"))



# --- 1. no program started by a file's content ---------------------------------------------------------

def test_an_eps_named_like_a_photo_never_starts_ghostscript(runs, tmp_path: Path, monkeypatch) -> None:
    calls = tmp_path / "gs-calls"
    fake = tmp_path / "bin" / "gs"  # stands in for Ghostscript, which Pillow's EPS plugin would run
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(EPS)
    good = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(good)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs["s2"]), str(photo), str(good), "--detect", "none", "-o", str(out)]) == 1
    rows = rows_of(out)
    assert "accepted format" in rows[0]["error"] and rows[1]["label"] and not rows[1]["error"]
    assert not calls.exists()


def test_phone_formats_decode_in_process(tmp_path: Path) -> None:
    pytest.importorskip("pillow_heif")
    from ceprompt.data.images import open_image

    for suffix in (".heic", ".avif"):
        path = tmp_path / f"phone{suffix}"
        Image.new("RGB", (40, 30), (200, 30, 10)).save(path)
        assert open_image(path).size == (40, 30)


# --- 2. the web server under load and silence ------------------------------------------------------------

@pytest.fixture()
def client_for(runs):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ceprompt.server.app import create_app

    def make(**options):
        return TestClient(create_app(ceprompt.load(runs["s2"], device="cpu"), **options))
    return make


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 100, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_beyond_the_pixel_budget_get_503_at_once(client_for, monkeypatch) -> None:
    import ceprompt.server.limits as limits

    client = client_for(pixel_budget=3_000_000)
    release = threading.Event()
    real = limits.scaled_for_queue
    monkeypatch.setattr(limits, "scaled_for_queue", lambda image, side: (release.wait(30), real(image, side))[1])
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=client.post(
        "/api/predict?detect=none", files={"file": ("a.png", png(2000, 1000), "image/png")})))
    worker.start()
    time.sleep(0.5)  # the first upload (2 MP) holds its pixels while it decodes
    start = time.monotonic()
    second = client.post("/api/predict?detect=none", files={"file": ("b.png", png(1500, 1000), "image/png")})
    assert second.status_code == 503 and second.headers["retry-after"] and time.monotonic() - start < 5
    release.set()
    worker.join(30)
    assert first["r"].status_code == 200
    again = client.post("/api/predict?detect=none", files={"file": ("b.png", png(1500, 1000), "image/png")})
    assert again.status_code == 200  # the budget was given back


def test_large_uploads_wait_scaled_down_and_boxes_stay_in_upload_pixels(client_for) -> None:
    from ceprompt.server.limits import MAX_SIDE

    client = client_for()
    response = client.post("/api/predict?detect=none", files={"file": ("big.png", png(MAX_SIDE * 2, 600), "image/png")})
    body = response.json()
    assert response.status_code == 200 and (body["width"], body["height"]) == (MAX_SIDE * 2, 600)
    assert body["faces"][0]["box"] == [0.0, 0.0, float(MAX_SIDE * 2), 600.0]


def test_a_part_without_a_filename_is_not_echoed_and_info_hides_paths(client_for, runs) -> None:
    client = client_for()
    payload = b"A" * 200_000
    response = client.post("/api/predict", files={"file": (None, payload, "image/png")})
    assert response.status_code == 422 and len(response.content) < 2000 and b"AAAA" not in response.content
    info = client.get("/api/info").json()
    assert info["checkpoint"] == "best.safetensors" and str(runs["s2"]) not in json.dumps(info)


def _start_server(protocol) -> tuple[object, int]:
    import uvicorn

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning",
                                           timeout_keep_alive=1, lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    return server, port


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_slow_headers_and_too_many_connections_are_dropped() -> None:
    pytest.importorskip("uvicorn")
    from ceprompt.server.limits import guarded_protocol

    server, port = _start_server(guarded_protocol(max_connections=3, header_timeout=1.0)[0])
    try:
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"GET / HT")  # headers that never complete
        start = time.monotonic()
        assert _closed_within(trickle, 5) and time.monotonic() - start < 4
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_within(extra, 2)  # over the cap: closed at once
        for s in idle:
            assert _closed_within(s, 5)  # silent ones go after the header timeout
        normal = socket.create_connection(("127.0.0.1", port))
        normal.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        normal.settimeout(5)
        assert normal.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True


def test_repeated_log_lines_are_counted_not_repeated() -> None:
    import logging

    from ceprompt.server.limits import RepeatFilter

    f = RepeatFilter(interval=60)
    records = [logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", None, None)
               for _ in range(6000)]
    assert sum(f.filter(r) for r in records) == 1


# --- 3. files read back are validated before they cost anything ------------------------------------------

def test_a_hub_folder_declaring_more_blocks_than_its_weights_is_refused_before_building(runs, tmp_path: Path,
                                                                                        monkeypatch) -> None:
    import ceprompt.weights.build as build

    folder = tmp_path / "hub"
    assert main(["export", "hub", str(runs["s2"]), str(folder), "--dtype", "fp32"]) == 0
    config = json.loads((folder / "config.json").read_text())
    for blocks in (2000, 10**6):
        config["clip_spec"]["vision_layers"] = blocks
        (folder / "config.json").write_text(json.dumps(config))
        built = []
        monkeypatch.setattr(build, "build_clip", lambda *a, **k: built.append(a))
        with pytest.raises(CheckpointError, match="declares a CLIP of|vision_layers"):
            ceprompt.load(folder, device="cpu")
        assert not built


def test_an_interrupted_hub_export_is_never_taken_for_a_model(runs, tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    assert main(["export", "hub", str(runs["s2"]), str(folder), "--dtype", "fp32"]) == 0
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1  # other weights beside this config.json (a killed --overwrite)
    save_file(tensors, str(weights), metadata={"format": "pt", "ceprompt.format": "ceprompt-hub"})
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        ceprompt.load(folder, device="cpu")


def test_compressed_zip_entries_are_not_inflated(tmp_path: Path, capsys) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("bomb/data/0", bytes(80 << 20))  # 80 MiB of zeros: 80 KB compressed
    assert bomb.stat().st_size < 1 << 20
    for argv in (["convert", str(bomb), str(tmp_path / "x.safetensors")],):
        assert main(argv) == 1
        assert "no more than 64 MiB compressed is inflated" in capsys.readouterr().err


def test_video_frames_obey_the_pixel_limit(runs, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    video = tmp_path / "big.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((240, 320, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs["s2"]), str(video), "--detect", "none", "-o", str(out), "--max-pixels",
                 "50000"]) == 1
    assert "over the limit of 50,000" in rows_of(out)[0]["error"]


def test_yaml_that_expands_is_refused_in_one_short_line(tmp_path: Path, capsys) -> None:
    laughs = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    laughs.write_text("\n".join(lines) + "\n")
    assert main(["train", "--config", str(laughs)]) == 1
    err = capsys.readouterr().err
    assert len(err) < 1000 and "YAML aliases" in err
    assert main(["train", "--config", "rafdb_stage1", "--set", "optim.epochs=" + "9" * 400]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err) < 400


def _clip_file(tmp_path: Path, spec_edit=None, tensor_edit=None) -> Path:
    from ceprompt.weights.clip_files import SPEC_METADATA_KEY

    clip = build_clip("tiny-vit", seed=0)
    tensors = {k: v.contiguous() for k, v in clip.state_dict().items()}
    spec = get_arch("tiny-vit").to_dict()
    if spec_edit:
        spec_edit(spec)
    if tensor_edit:
        tensor_edit(tensors)
    path = tmp_path / "clip.safetensors"
    save_file(tensors, str(path), metadata={SPEC_METADATA_KEY: json.dumps(spec), "format": "pt"})
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(vision_heads=0), "vision_heads=0"),
    (lambda s: s.update(vision_heads=-2), "vision_heads=-2"),
    (lambda s: s.update(vision_heads="5"), "vision_heads='5'"),
    (lambda s: s.update(text_layers=[2]), "text_layers=[2]"),
])
def test_crafted_clip_metadata_is_one_line(tmp_path: Path, edit, message) -> None:
    from ceprompt.weights.clip_files import load_clip

    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_clip(_clip_file(tmp_path, spec_edit=edit))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int8, torch.float8_e4m3fn])
def test_weights_that_are_not_real_floats_are_refused(tmp_path: Path, dtype) -> None:
    from ceprompt.weights.clip_files import load_clip

    def edit(tensors):
        key = "visual.proj"
        tensors[key] = tensors[key].to(dtype) if dtype != torch.complex64 else \
            torch.complex(tensors[key], torch.full_like(tensors[key], float("nan")))
    with pytest.raises(CheckpointError, match="visual.proj is"):
        load_clip(_clip_file(tmp_path, tensor_edit=edit))


@pytest.mark.parametrize("config, message", [
    ({"vision_config": {"num_attention_heads": 0}, "text_config": {}}, "num_attention_heads=0"),
    ({"vision_config": {"num_attention_heads": "abc"}, "text_config": {}}, "num_attention_heads='abc'"),
    ({"vision_config": {"num_attention_heads": [2]}, "text_config": {}}, r"num_attention_heads=\[2\]"),
    ({"vision_config": [], "text_config": {}}, "vision_config=\\[\\]"),
    ([1, 2], "expected a JSON object"),
])
def test_crafted_huggingface_configs_are_one_line(tmp_path: Path, config, message) -> None:
    from ceprompt.weights.clip_files import load_clip

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_clip(folder)


def test_json_nested_without_end_is_refused_not_a_recursion(runs, tmp_path: Path, monkeypatch) -> None:
    from ceprompt.core.io_utils import verified_sha256

    deep = "[" * 100_000 + "]" * 100_000
    tensors, meta, _ = read_checkpoint(runs["s1"])
    crafted = tmp_path / "deep.safetensors"
    save_file(tensors, str(crafted), metadata={"ceprompt.meta": deep, "format": "pt"})
    with pytest.raises(CheckpointError, match="nested 100000 levels"):
        read_checkpoint(crafted)
    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text(deep)  # a poisoned cache is dropped, every load still works
    assert len(verified_sha256(crafted)) == 64


def test_a_replaced_file_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path, monkeypatch) -> None:
    from ceprompt.core.io_utils import verified_sha256

    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1" * 100)
    b.write_bytes(b"2" * 100)
    first = verified_sha256(a)
    stat = a.stat()
    os.replace(b, a)  # what cp -p or rsync -t do: other content, the same size and mtime
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verified_sha256(a) != first


# --- 4. nothing the user had is replaced, nothing half-written is trusted --------------------------------

def test_outputs_that_exist_are_refused_before_work(runs, tmp_path: Path, capsys) -> None:
    data = runs["data"]
    index = tmp_path / "images.txt"
    index.write_text("keep me\n")
    assert main(["check-data", str(data), "--dataset", "rafdb", "--json", str(index)]) == 1
    assert index.read_text() == "keep me\n" and "--overwrite" in capsys.readouterr().err
    pictures = tmp_path / "annotated"
    pictures.mkdir()
    (pictures / "00000_face.png").write_bytes(b"mine")
    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(face)
    assert main(["predict", str(runs["s2"]), str(face), "--detect", "none", "--annotate", str(pictures)]) == 1
    assert (pictures / "00000_face.png").read_bytes() == b"mine"


def test_devices_are_never_output_files(runs, tmp_path: Path, capsys) -> None:
    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(face)
    assert main(["predict", str(runs["s2"]), str(face), "--detect", "none", "-o", "/dev/full", "--overwrite"]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_no_partial_output(runs, tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    from ceprompt.verbs import predict

    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(face)

    def full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(predict.Writer, "write", full)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs["s2"]), str(face), "--detect", "none", "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    stdout_full = subprocess.run([sys.executable, "-m", "ceprompt", "predict", str(runs["s2"]), str(face), "--detect",
                                  "none", "--no-progress"], stdout=open("/dev/full", "w"), stderr=subprocess.PIPE,
                                 text=True, timeout=300)
    assert stdout_full.returncode == 1 and "Traceback" not in stdout_full.stderr


def test_prepare_checks_its_index_files_first_and_redoes_truncated_crops(tmp_path: Path, capsys) -> None:
    pytest.importorskip("facenet_pytorch")
    skimage_data = pytest.importorskip("skimage.data")
    src = tmp_path / "raf"
    (src / "EmoLabel").mkdir(parents=True)
    (src / "Image" / "original").mkdir(parents=True)
    Image.fromarray(skimage_data.astronaut()).save(src / "Image" / "original" / "train_00001.jpg")
    Image.fromarray(skimage_data.astronaut()).save(src / "Image" / "original" / "test_0001.jpg")
    (src / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\ntest_0001.jpg 5\n")
    dst = tmp_path / "out"
    (dst / "EmoLabel").mkdir(parents=True)
    (dst / "EmoLabel" / "images.txt").write_text("mine\n")
    assert main(["prepare", "rafdb", str(src), str(dst), "--align"]) == 1
    assert "--overwrite" in capsys.readouterr().err and not (dst / "Image").exists()  # refused before aligning
    (dst / "EmoLabel" / "images.txt").unlink()
    crop = dst / "Image" / "aligned_224" / "train_00001_aligned.jpg"
    crop.parent.mkdir(parents=True)
    crop.write_bytes(b"\xff\xd8\xff\xe0truncated")  # what a run killed mid-write could leave
    assert main(["prepare", "rafdb", str(src), str(dst), "--align"]) == 0
    assert Image.open(crop).size == (224, 224)


def test_safetensors_outputs_follow_the_umask(runs, tmp_path: Path) -> None:
    from ceprompt.weights.clip_files import save_clip_safetensors

    old = os.umask(0o022)
    try:
        save_clip_safetensors(build_clip("tiny-vit", seed=0), get_arch("tiny-vit"), tmp_path / "c.safetensors")
        assert main(["export", "hub", str(runs["s2"]), str(tmp_path / "hub")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "c.safetensors", tmp_path / "hub" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644


# --- 5. results that would look fine and be wrong --------------------------------------------------------

def test_a_prompt_that_does_not_fit_is_refused_naming_the_class(tmp_path: Path, runs, capsys) -> None:
    long = " ".join(["very"] * 80) + " {}"
    args = ["train", "--config", "rafdb_stage1", "--data", str(runs["data"]), "--set", "backbone.arch=tiny-vit",
            "--set", f"eva.template={long}", "--set", "data.workers=0", "--output-dir", str(tmp_path), "--name", "t"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the prompt for class 'surprise'" in err and "cut off" in err and not (tmp_path / "t").exists()


@pytest.mark.parametrize("classes, message", [
    (["a"], "at least 2"),
    (["a", "b", "a"], "more than once"),
    (["a", "../../../../etc"], "not a plain folder name"),
])
def test_folder_datasets_that_cannot_train_are_refused(tmp_path: Path, classes, message) -> None:
    from ceprompt.core.errors import DataError
    from ceprompt.data.datasets import load_splits

    root = write_folder_dataset(tmp_path / "d", ["a", "b"])
    with pytest.raises(DataError, match=message):
        load_splits("folder", root, classes=classes)


def test_training_refuses_an_empty_test_split(tmp_path: Path, capsys) -> None:
    root = write_folder_dataset(tmp_path / "d", ["a", "b"], n_test=0)
    args = ["train", "--config", "rafdb_stage1", "--data", str(root), "--set", "data.dataset=folder", "--set",
            "backbone.arch=tiny-vit", "--set", "head.top_k=4", "--set", "data.workers=0", "--output-dir",
            str(tmp_path), "--name", "t"]
    assert main(args) == 1 and "no test images" in capsys.readouterr().err


def test_the_same_image_in_train_and_test_is_reported(tmp_path: Path) -> None:
    from ceprompt.data.check import check_data

    root = write_three_file_dataset(tmp_path / "raf", "rafdb", n_train=1, n_test=1)
    images = root / "EmoLabel" / "images.txt"
    lines = images.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " " + lines[0].split()[1]  # id 2 (a test image) points at id 1's file
    images.write_text("\n".join(lines) + "\n")
    report = check_data("rafdb", root)
    assert any("both the training and the test split" in e for e in report.errors)


def test_arrays_are_scaled_by_their_type_or_refused(runs) -> None:
    rec = ceprompt.load(runs["s2"], device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    want = rec.predict(pixels, detect="none")[0].probabilities
    for same in (pixels.astype(np.uint16) * 257, pixels.astype(np.float32), pixels.astype(np.float32) / 255):
        assert rec.predict(same, detect="none")[0].probabilities == pytest.approx(want, abs=1e-6)
    for bad in (pixels.astype(np.float32) * 2, pixels.astype(np.int16) - 300, np.full((8, 8), np.nan)):
        with pytest.raises(CepromptError, match="image array"):
            rec.predict(bad, detect="none")


def test_csv_cells_never_become_spreadsheet_formulas(runs, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (150, 120, 100)).save(tmp_path / "=HYPERLINK(1).png")
    assert main(["predict", str(runs["s2"]), "=HYPERLINK(1).png", "--detect", "none", "-o", "p.csv"]) == 0
    assert rows_of(tmp_path / "p.csv")[0]["path"] == "'=HYPERLINK(1).png"  # shown as text, never run
