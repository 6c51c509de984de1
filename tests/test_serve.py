"""The local web app: JSON API checks, concurrency, and the page in a real headless Chromium."""

from __future__ import annotations

import contextlib
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
# The page has loaded its model's description. A function, not a bare expression: Playwright eval()s an
# expression in the page, which the page's Content-Security-Policy refuses (and did, under load).
MODEL_SHOWN = "() => document.getElementById('model').textContent.includes('classes')"


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


@contextlib.contextmanager
def running_server(checkpoint: Path, *extra: str):
    """``ceprompt serve`` on a free loopback port, as a user starts it (upload limit 1 MB)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ceprompt", "serve", str(checkpoint), "--port", str(port),
                             "--max-upload-mb", "1", "--device", "cpu", *extra],
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
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_tiny_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(runs):
    with running_server(runs["s2"]) as url:
        yield url


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


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_browser = pytest.mark.skipif(not CHROMIUM and not BROWSER_REQUIRED,
                                   reason="needs Debian's chromium (installed by .ci/run)")


@needs_browser
def test_page_in_headless_chromium(server: str, images: dict[str, bytes], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    assert CHROMIUM, "chromium is required in CI"
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(images["astronaut.png"])
    expected = post(server, "astronaut.png", images["astronaut.png"]).json()["faces"]
    info_class = httpx.get(server + "/api/info").json()["classes"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/")
        page.wait_for_function(MODEL_SHOWN)
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
        # naming classes re-sends the photo: one bar per named class, and the page says which were not trained
        named = post(server, "astronaut.png", images["astronaut.png"], classes=f"{info_class},bored").json()
        page.fill("#classes", f" {info_class}, bored ")
        page.press("#classes", "Enter")
        sync_api.expect(page.locator(".face .bar")).to_have_count(2 * len(expected), timeout=60_000)
        rows = page.locator(".face").first.locator(".row span:first-child").all_inner_texts()
        assert sorted(rows) == sorted([info_class, "bored"])
        assert named["classes_note"] in page.locator("#status").inner_text()
        browser.close()
    assert Image.open(shot).size[0] == 1280
    if os.environ.get("CEPROMPT_SCREENSHOT_DIR"):  # keep the screenshot for a person to look at
        shutil.copy(shot, os.environ["CEPROMPT_SCREENSHOT_DIR"])


def test_serve_without_checkpoint_uses_the_cached_demo_model(tmp_path: Path, monkeypatch) -> None:
    from ceprompt.server import app as server_app

    monkeypatch.setenv("CEPROMPT_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    best = tmp_path / "demo" / "serve" / "stage2" / "checkpoints" / "best.safetensors"
    trained: list[Path] = []
    monkeypatch.setattr("ceprompt.demo.run.run_demo", lambda out, **kw: trained.append(out) or
                        (best.parent.mkdir(parents=True) or best.write_bytes(b"x")))
    assert server_app.resolve_checkpoint(None) == str(best)  # trained once (here: faked) ...
    assert server_app.resolve_checkpoint(None) == str(best)  # ... then reused
    assert trained == [tmp_path / "demo" / "serve"]
    assert server_app.resolve_checkpoint("mine.safetensors") == "mine.safetensors"
    # the user's own demo run (ceprompt demo writes runs/demo) wins over the cached quick one
    own = tmp_path / "runs" / "demo" / "stage2" / "checkpoints" / "best.safetensors"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    assert Path(server_app.resolve_checkpoint(None)).resolve() == own.resolve() and len(trained) == 1


def test_a_demo_model_says_so_in_the_api(runs, tmp_path: Path) -> None:
    """The page, /api/info and every prediction of a model trained on drawn faces say so."""
    import warnings

    from fastapi.testclient import TestClient

    import ceprompt
    from ceprompt.server.app import create_app, guarded
    from ceprompt.weights.checkpoint import read_checkpoint, save_checkpoint

    tensors, meta, _ = read_checkpoint(runs["s1"])
    notice = "Demo model: it learned drawn faces only"
    save_checkpoint(tmp_path / "demo.safetensors", tensors, {**meta, "notice": notice})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = ceprompt.load(tmp_path / "demo.safetensors", device="cpu")
    client = TestClient(guarded(create_app(rec), "127.0.0.1", 10_000_000), base_url="http://127.0.0.1:8000")
    assert client.get("/api/info").json()["notice"] == notice
    body = client.post("/api/predict", files={"file": ("a.png", png_bytes(Image.new("RGB", (40, 40))))},
                       params={"detect": "none"}).json()
    assert body["notice"] == notice and len(body["faces"]) == 1
    assert 'id="notice"' in client.get("/").text and "info.notice" in client.get("/static/app.js").text


# --- hardening (issue 13, section 5) ------------------------------------------------------------------


def _asgi_call(app, headers: dict[str, str], chunks: list[bytes], delay: float = 0.0, method: str = "POST"):
    """Call an ASGI app directly; returns (status, body, how many chunks it read)."""
    import asyncio

    sent: list[dict] = []
    read = {"n": 0}

    async def receive():
        if read["n"] < len(chunks):
            if delay:
                await asyncio.sleep(delay)
            read["n"] += 1
            return {"type": "http.request", "body": chunks[read["n"] - 1], "more_body": read["n"] < len(chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/api/predict", "headers":
             [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, read["n"], dict(start["headers"])


def _reading_app():
    async def app(scope, receive, send):  # reads the whole body, like a form parser, then answers 200
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def test_guard_refuses_oversize_bodies_before_reading_them() -> None:
    from ceprompt.server.guard import Guard

    guard = Guard(_reading_app(), "127.0.0.1", max_body=1_000_000)
    host = {"host": "127.0.0.1:8000"}
    status, body, n, _ = _asgi_call(guard, {**host, "content-length": str(300_000_000)}, [b"x" * 1000] * 5)
    assert status == 413 and n == 0 and b"300000000 bytes exceeds the limit" in body  # not one byte read
    chunks = [b"x" * 100_000] * 3000  # 300 MB announced by nobody: chunked
    status, body, n, _ = _asgi_call(guard, host, chunks)
    assert status == 413 and n <= 12  # stopped just past the limit, not after 300 MB
    status, _, n, _ = _asgi_call(guard, host, [b"x" * 1000] * 3)
    assert status == 200 and n == 3


def test_guard_times_out_slow_bodies() -> None:
    from ceprompt.server.guard import Guard

    guard = Guard(_reading_app(), "127.0.0.1", max_body=1_000_000, body_timeout=0.5)
    status, body, _, _ = _asgi_call(guard, {"host": "127.0.0.1"}, [b"x"] * 100, delay=0.1)
    assert status == 408 and b"did not arrive within" in body


def test_guard_checks_host_and_origin() -> None:
    from ceprompt.server.guard import Guard

    local = Guard(_reading_app(), "127.0.0.1", 1000)
    assert _asgi_call(local, {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, [b"x"])[0] == 200
    assert _asgi_call(local, {"host": "localhost:8000"}, [b"x"])[0] == 200
    assert _asgi_call(local, {"host": "attacker.example:8000"}, [b"x"])[0] == 421  # DNS rebinding
    assert _asgi_call(local, {"host": "127.0.0.1:8000", "origin": "https://evil.example"}, [b"x"])[0] == 403
    allowed = Guard(_reading_app(), "127.0.0.1", 1000, allow_origins=["https://lab.example.org"],
                    allow_hosts=["fer.lab.example.org"])
    assert _asgi_call(allowed, {"host": "127.0.0.1:8000", "origin": "https://lab.example.org"}, [b"x"])[0] == 200
    assert _asgi_call(allowed, {"host": "fer.lab.example.org"}, [b"x"])[0] == 200
    everywhere = Guard(_reading_app(), "0.0.0.0", 1000)
    assert _asgi_call(everywhere, {"host": "192.168.1.20:8000"}, [b"x"])[0] == 200  # reached by IP address
    assert _asgi_call(everywhere, {"host": "attacker.example"}, [b"x"])[0] == 421


def test_api_pixel_limit_tiny_images_and_security_headers(server: str) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    started = time.perf_counter()
    r = post(server, "bomb.png", bomb)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"] and time.perf_counter() - started < 5
    dot = post(server, "dot.png", png_bytes(Image.new("RGB", (1, 1))))
    assert dot.status_code == 200 and dot.json()["faces"] == []
    garbage = httpx.post(server + "/api/predict", files={"file": ("x", b"not an image")}, timeout=60)
    assert garbage.status_code == 415 and "BytesIO" not in garbage.json()["detail"]
    page = httpx.get(server + "/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and "style=" not in page.text and "innerHTML" not in httpx.get(
        server + "/static/app.js").text
    cross = httpx.post(server + "/api/predict", files={"file": ("dot.png", png_bytes(Image.new("RGB", (1, 1))))},
                       headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert httpx.get(server + "/api/info", headers={"Host": "evil.example"}).status_code == 421


@needs_browser
def test_class_names_cannot_inject_script_into_the_page(runs, images: dict[str, bytes], tmp_path: Path) -> None:
    """Class names come from folder names and checkpoint files: the page must show them as text."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from ceprompt.weights.checkpoint import read_checkpoint, save_checkpoint

    tensors, meta, _ = read_checkpoint(runs["s1"])
    payload = "<img src=x onerror=\"document.title='pwned'\">"
    meta["class_names"] = [payload + str(i) for i in range(len(meta["class_names"]))]
    meta["notice"] = "Demo model " + payload
    save_checkpoint(tmp_path / "crafted.safetensors", tensors, meta)
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(images["astronaut.png"])
    with running_server(tmp_path / "crafted.safetensors") as url:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(MODEL_SHOWN)
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector(".face-label", timeout=60_000)
            page.wait_for_timeout(300)
            assert page.title() != "pwned"
            assert page.locator("#result img").count() == 0  # no element was made from a class name
            assert payload in page.locator(".face-label").first.inner_text()
            assert payload in page.locator("#model").inner_text()
            assert page.locator("#notice").is_visible() and payload in page.locator("#notice").inner_text()
            browser.close()


@needs_browser
def test_live_camera_page_follows_faces_in_headless_chromium(runs, tmp_path: Path) -> None:
    """Chromium's fake camera plays a clip of two real faces swinging side by side; the page sends its frames over
    the WebSocket and draws boxes with track ids that keep their ids over the clip; a closed tab ends its session."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from videos import scene, swinging, write_y4m

    n = 40
    left, right = swinging((40, 40), 30, n), swinging((300, 160), 30, n, phase=3.14159)
    clip = write_y4m(tmp_path / "clip.y4m", scene(n, (480, 360), [lambda i: left[i], lambda i: right[i]]))
    with running_server(runs["s2"]) as url:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                *CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={clip}"])
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(MODEL_SHOWN)
            page.click("#camera")
            seen: list[list[str]] = []
            for answer in range(3, 15, 2):  # the track ids of several answers, over more than a loop of the clip
                page.wait_for_function("n => document.getElementById('live-info').textContent.includes('answer ' + n)",
                                       arg=answer, timeout=60_000)
                seen.append(sorted(t.split(":")[0] for t in page.locator(".face-label").all_inner_texts()))
            drawn = page.evaluate("""() => { const c = document.getElementById('overlay');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
            assert seen == [["Track 1", "Track 2"]] * len(seen), seen
            assert drawn > 500  # boxes and labels over the live picture
            assert httpx.get(url + "/api/info").json()["live"]["sessions"] == 1
            page.close()
            deadline = time.time() + 30
            while httpx.get(url + "/api/info").json()["live"]["sessions"] and time.time() < deadline:
                time.sleep(0.2)
            assert httpx.get(url + "/api/info").json()["live"]["sessions"] == 0  # the closed tab ended its session
            browser.close()


def faces_tiled(n: int) -> bytes:
    """One photo holding ``n`` real faces (the astronaut's head, tiled)."""
    from videos import head

    face = head(96)
    columns = 4
    image = Image.new("RGB", (columns * 110, -(-n // columns) * 130), (120, 130, 140))
    for i in range(n):
        image.paste(face, ((i % columns) * 110 + 7, (i // columns) * 130 + 5))
    return png_bytes(image)


def test_work_per_request_is_bounded_and_concurrent_requests_share_forward_passes(runs) -> None:
    """Faces per upload capped (the largest kept, the rest counted), explanations drawn for a bounded number, and
    requests that arrive together classified together."""
    with running_server(runs["s2"], "--max-faces", "5") as url:
        tiled = faces_tiled(12)
        body = post(url, "group.png", tiled).json()
        assert len(body["faces"]) == 5 and body["faces_left_out"] == 7
        explained = post(url, "group.png", tiled, explain="true").json()
        assert len(explained["faces"]) == 5 and all("explanation_png" in f for f in explained["faces"])
        before = httpx.get(url + "/api/info").json()["batching"]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: post(url, "group.png", tiled), range(16)))
        assert all(a.status_code == 200 and len(a.json()["faces"]) == 5 for a in answers)
        after = httpx.get(url + "/api/info").json()["batching"]
        requests, passes = after["requests"] - before["requests"], after["forward_passes"] - before["forward_passes"]
        assert requests == 16 and passes < 16  # some requests shared a forward pass


def test_requests_waiting_together_go_to_the_detector_together(runs) -> None:
    """The worker hands the frames of one batch to the detector in one call (on a GPU it searches same-size images
    together), and each answer is the one a request alone gets."""
    import asyncio

    from skimage import data as skimage_data

    import ceprompt
    from ceprompt.server.worker import Job, ModelWorker

    rec = ceprompt.load(runs["s2"], device="cpu")
    photo = Image.fromarray(skimage_data.astronaut())
    alone = rec.find_faces(photo)
    calls = []
    real = rec.find_faces_many
    rec.find_faces_many = lambda images, *args, **kwargs: (calls.append(len(images)), real(images, *args, **kwargs))[1]
    worker = ModelWorker(rec, window=5.0)

    async def three() -> list:
        with worker.arriving() as a, worker.arriving() as b, worker.arriving() as c:
            futures = [a.run(Job(photo)), b.run(Job(photo.copy())), c.run(Job(photo, detect="none"))]
        return await asyncio.gather(*futures)

    try:
        answers = asyncio.run(three())
    finally:
        worker.close()
    assert sorted(calls) == [1, 2] and worker.batches == [3]  # mtcnn's two together, detect=none on its own
    for answer in answers[:2]:
        assert [face.box for face in answer.faces] == [pytest.approx(face.box, abs=0.006) for face, _ in alone]
    assert len(answers[2].faces) == 1 and answers[2].faces[0].box == (0, 0, photo.width, photo.height)


def test_one_client_cannot_take_every_connection(runs) -> None:
    """A client (127.0.0.2) holding sockets that trickle headers gets its share; another client is still served."""
    with running_server(runs["s2"], "--max-connections", "16", "--max-connections-per-client", "4") as url:
        port = int(url.rsplit(":", 1)[1])
        held = []
        for _ in range(10):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET / HT")
            held.append(sock)
        time.sleep(0.5)
        closed = 0
        for sock in held:
            sock.settimeout(0.2)
            try:
                closed += sock.recv(16) == b""
            except (socket.timeout, TimeoutError):
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 6  # over its share of 4: closed at once; the others stay until the header timeout
        assert all(httpx.get(url + "/api/info", timeout=10).status_code == 200 for _ in range(8))
        for sock in held:
            sock.close()


def test_the_live_websocket_checks_host_and_origin(server: str) -> None:
    ws_client = pytest.importorskip("websockets.sync.client")
    from websockets.exceptions import InvalidStatus

    address = server.replace("http://", "ws://") + "/api/live"
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(InvalidStatus) as refused:  # another site's page
        ws_client.connect(address, origin="http://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:  # DNS rebinding: a name this server does not answer to
        ws_client.connect(f"ws://evil.example:{port}/api/live", sock=socket.create_connection(("127.0.0.1", port)),
                          open_timeout=10)
    assert refused.value.response.status_code == 403
    with ws_client.connect(address, origin=server, open_timeout=10) as ws:  # the page's own origin
        import json as json_module
        import struct

        ws.send(struct.pack("<d", 0.0) + b"not an image at all")
        assert "cannot decode" in json_module.loads(ws.recv(timeout=30))["error"]
        # a capture time that is not a number is not echoed as NaN, which no JSON parser of the page accepts
        frame = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 110, 100)).save(frame, format="PNG")
        ws.send(struct.pack("<d", float("nan")) + frame.getvalue())
        answer = json_module.loads(ws.recv(timeout=60), parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
        assert answer["t"] is None and answer["faces"] == []
    from websockets.exceptions import ConnectionClosed

    with ws_client.connect(address, origin=server, open_timeout=10) as ws:  # too short to hold a capture time
        ws.send(b"\x00\x01\x02")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1007 and "expected an 8-byte capture time" in closed.value.rcvd.reason


def test_running_short_of_memory_is_a_503_not_a_bad_image(runs, images, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    import ceprompt
    from ceprompt.server import app as app_module
    from ceprompt.server import limits

    rec = ceprompt.load(runs["s2"], device="cpu")
    client = TestClient(app_module.create_app(rec))

    def short(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(limits, "open_image", short)
    answer = client.post("/api/predict", files={"file": ("a.png", images["astronaut.png"], "image/png")})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
