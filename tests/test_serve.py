"""The local web app: JSON API checks, concurrency, and the page in a real headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import train_tiny_runs

pytest.importorskip("fastapi")
pytest.importorskip("facenet_pytorch")
httpx = pytest.importorskip("httpx")
skimage_data = pytest.importorskip("skimage.data")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_REQUIRED = os.environ.get("CEPROMPT_BROWSER_TESTS") == "required"  # set by .ci/run


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    return {
        "astronaut.png": png_bytes(Image.fromarray(skimage_data.astronaut())),
        "plain.jpg": png_bytes(Image.fromarray((rng.random((90, 120, 3)) * 60 + 90).astype(np.uint8)), "JPEG"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``ceprompt serve`` on a free loopback port, as a user starts it (upload limit 1 MB)."""
    runs = train_tiny_runs(tmp_path_factory.mktemp("serve"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ceprompt", "serve", str(runs["s2"]), "--port", str(port),
                             "--max-upload-mb", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/api/info", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def post(url: str, name: str, data: bytes, content_type: str = "image/png", **params) -> httpx.Response:
    return httpx.post(url + "/api/predict", files={"file": (name, data, content_type)}, params=params, timeout=120)


def test_api_predicts_and_refuses_bad_uploads(server: str, images: dict[str, bytes]) -> None:
    info = httpx.get(server + "/api/info").json()
    assert len(info["classes"]) == 7 and info["max_upload_bytes"] == 1_000_000
    ok = post(server, "astronaut.png", images["astronaut.png"])
    assert ok.status_code == 200
    body = ok.json()
    assert (body["width"], body["height"]) == (512, 512) and len(body["faces"]) == 1
    face = body["faces"][0]
    assert set(face) >= {"box", "label", "score", "probabilities", "landmarks"} and face["label"] in info["classes"]
    assert post(server, "plain.jpg", images["plain.jpg"], "image/jpeg").json()["faces"] == []
    explained = post(server, "astronaut.png", images["astronaut.png"], explain="true").json()["faces"][0]
    assert explained["explanation_png"].startswith("data:image/png;base64,")
    text = post(server, "notes.txt", b"hello", "text/plain")
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    fake = post(server, "fake.png", b"\x89PNG but not really")
    assert fake.status_code == 415 and "not a readable image" in fake.json()["detail"]
    big = post(server, "big.png", os.urandom(1_200_000))
    assert big.status_code == 413 and "limit of 1000000 bytes" in big.json()["detail"]
    assert post(server, "x.png", images["astronaut.png"], detect="sideways").status_code == 422
    schema = httpx.get(server + "/openapi.json").json()
    assert "/api/predict" in schema["paths"]


def test_fifty_concurrent_requests_match_single_requests(server: str, images: dict[str, bytes]) -> None:
    names = ["astronaut.png", "plain.jpg"]
    single = {(n, d): post(server, n, images[n], detect=d).json()["faces"] for n in names for d in ("mtcnn", "none")}
    jobs = [(names[i % 2], ("mtcnn", "none")[(i // 2) % 2]) for i in range(50)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda job: post(server, job[0], images[job[0]], detect=job[1]), jobs))
    assert all(r.status_code == 200 for r in responses)
    for (name, detect), r in zip(jobs, responses):
        assert r.json()["filename"] == name
        got, want = r.json()["faces"], single[(name, detect)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g["label"] == w["label"] and g["box"] == w["box"]
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


@pytest.mark.skipif(not CHROMIUM and not BROWSER_REQUIRED, reason="needs Debian's chromium (installed by .ci/run)")
def test_page_in_headless_chromium(server: str, images: dict[str, bytes], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    assert CHROMIUM, "chromium is required in CI"
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(images["astronaut.png"])
    expected = post(server, "astronaut.png", images["astronaut.png"]).json()["faces"]
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector(".face-label", timeout=60_000)
        labels = page.locator(".face-label").all_inner_texts()
        assert labels == [f"Face {i + 1}: {f['label']}" for i, f in enumerate(expected)]
        assert page.locator(".face .bar").count() == 7 * len(expected)
        assert page.evaluate("document.getElementById('canvas').width") == 512
        assert "1 face in astronaut.png" in page.locator("#status").inner_text()
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        # ticking "show the evidence" re-sends the photo and adds a heat map per face
        page.check("#explain")
        page.wait_for_selector("img.explanation", timeout=60_000)
        assert page.locator("img.explanation").count() == len(expected)
        browser.close()
    assert Image.open(shot).size[0] == 1280
    if os.environ.get("CEPROMPT_SCREENSHOT_DIR"):  # keep the screenshot for a person to look at
        shutil.copy(shot, os.environ["CEPROMPT_SCREENSHOT_DIR"])


def test_serve_without_checkpoint_uses_the_cached_demo_model(tmp_path: Path, monkeypatch) -> None:
    from ceprompt.server import app as server_app

    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path))
    best = tmp_path / "demo" / "serve" / "stage2" / "checkpoints" / "best.safetensors"
    trained: list[Path] = []
    monkeypatch.setattr("ceprompt.demo.run.run_demo", lambda out, **kw: trained.append(out) or
                        (best.parent.mkdir(parents=True) or best.write_bytes(b"x")))
    assert server_app.resolve_checkpoint(None) == str(best)  # trained once (here: faked) ...
    assert server_app.resolve_checkpoint(None) == str(best)  # ... then reused
    assert trained == [tmp_path / "demo" / "serve"]
    assert server_app.resolve_checkpoint("mine.safetensors") == "mine.safetensors"
