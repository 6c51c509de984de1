"""The verb-level cases of ``speed.py``: prediction, the web API, phone photos and the trainer."""

from __future__ import annotations

import copy
import csv
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ceprompt.api import Recognizer
from ceprompt.data.transforms import preprocess_for
from ceprompt.model.clip import get_arch
from ceprompt.weights.build import LoadedModel

from bench_common import CLASSES, PRECISIONS, interleaved, throughput

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def recognizer(model: torch.nn.Module, arch: str, device: str, precision: str) -> Recognizer:
    """A recognizer on a copy of ``model`` (a recognizer owns its model and may store its weights in bf16)."""
    pre = preprocess_for(get_arch(arch).image_size, *IMAGENET)
    return Recognizer(LoadedModel(copy.deepcopy(model), {}, Path("random"), pre, CLASSES), device=device,
                      precision=precision)


def astronaut() -> Image.Image:
    try:
        from skimage import data
        return Image.fromarray(data.astronaut())
    except ImportError:
        return Image.new("RGB", (512, 512), (120, 100, 90))


def face_crop_png(arch: str) -> bytes:
    """The astronaut's photo at the model's input size, as a PNG upload (one face crop per request)."""
    size = get_arch(arch).image_size
    buf = io.BytesIO()
    astronaut().resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def predict_crops(model: torch.nn.Module, arch: str, n: int, device: str, rounds: int) -> dict[str, float]:
    """``predict_batch`` on ``n`` face crops (``detect="none"``), decoded images in, probabilities out, and one
    crop at a time (``batch_size=1``, three calls: a phone photo, an API request, a camera frame); fp32 and bf16,
    all four taking turns."""
    size = get_arch(arch).image_size
    crops = [astronaut().resize((size, size))] * n
    cases = {}
    for precision in PRECISIONS:
        rec = recognizer(model, arch, device, precision)
        cases[precision] = (lambda rec=rec: rec.predict_batch(crops, detect="none", batch_size=n), n)

        def one_at_a_time(rec: Recognizer = rec) -> None:
            for _ in range(3):
                rec.predict_batch(crops[:1], detect="none", batch_size=1)
        cases[f"{precision} batch 1"] = (one_at_a_time, 3)
    return interleaved(cases, rounds, device)


def serve_requests(model: torch.nn.Module, arch: str, device: str, rounds: int) -> dict[str, float]:
    """Requests per second of ``POST /api/predict?detect=none`` with one face crop (PNG) each, in process, three
    requests per call; fp32 and bf16 taking turns."""
    from fastapi.testclient import TestClient

    from ceprompt.server.app import create_app

    upload = face_crop_png(arch)
    cases = {}
    for precision in PRECISIONS:
        client = TestClient(create_app(recognizer(model, arch, device, precision)))

        def requests(client: TestClient = client) -> None:
            for _ in range(3):
                response = client.post("/api/predict?detect=none",
                                       files={"file": ("face.png", upload, "image/png")})
                assert response.status_code == 200, response.text
        cases[precision] = (requests, 3)
    return interleaved(cases, rounds + 1, device)


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def phone_photo(model: torch.nn.Module, arch: str, device: str) -> dict[str, float]:
    """A 4032 x 3024 JPEG with one 360 px face: ``rec.predict(path)`` (auto precision) against its decode plus
    the model on one crop, and detection against MTCNN on the full image (what ceprompt 0.2 ran)."""
    from ceprompt.data.images import open_image

    rec = recognizer(model, arch, device, "auto")
    canvas = Image.new("RGB", (4032, 3024), (90, 110, 100))
    canvas.paste(astronaut().resize((2048, 2048), Image.BICUBIC), (1000, 500))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phone.jpg"
        canvas.save(path, quality=92)
        try:
            rec.predict(path)  # loads MTCNN
        except Exception as exc:  # facenet-pytorch not installed
            return {"skipped": str(exc).splitlines()[0][:80]}
        image = open_image(path)
        crop = rec.find_faces(image)[0][1]
        out = {"predict s": timed(lambda: rec.predict(path)), "decode s": timed(lambda: open_image(path)),
               "detect s": timed(lambda: rec.detector.detect(image)),
               "one face s": timed(lambda: rec.predict_batch([crop], detect="none"))}
    from facenet_pytorch import MTCNN

    full = MTCNN(keep_all=True, min_face_size=20, post_process=False, device=device)
    out["full-image MTCNN s"] = timed(lambda: full.detect(image), repeats=1)
    return out


def small_photos(model: torch.nn.Module, arch: str, device: str) -> float | str:
    rec = recognizer(model, arch, device, "auto")
    photos = [astronaut(), astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    try:
        return throughput(lambda: rec.predict_batch(photos), len(photos), 2, device)
    except Exception as exc:  # facenet-pytorch not installed
        return f"skipped ({str(exc).splitlines()[0][:80]})"


def video_frames(model: torch.nn.Module, arch: str, device: str, frames: int = 24) -> dict[str, float]:
    """Frames per second of ``rec.predict_video`` (decode, MTCNN, the model, tracking) on a generated 640x360 H.264
    clip with one moving face (the astronaut's), every frame sampled, auto precision."""
    from fractions import Fraction

    import av

    rec = recognizer(model, arch, device, "auto")
    head = astronaut().crop((140, 20, 310, 230)).resize((120, 148))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=Fraction(25))
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            for i in range(frames):
                canvas = Image.new("RGB", (640, 360), (90, 110, 130))
                canvas.paste(head, (40 + 18 * i, 100))
                for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        list(rec.predict_video(path, stride=1))  # loads MTCNN, warms up
        seconds = timed(lambda: list(rec.predict_video(path, stride=1)), repeats=2)
    return {"frames/s": frames / seconds, "precision": rec.precision}


def trainer_epochs(arch: str, batch: int, device: str, precisions: tuple[str, ...] = PRECISIONS,
                   processes: int = 0, steps_per_epoch: int = 2) -> dict[str, float]:
    """Epoch 2's training img/s of ``ceprompt train`` (a subprocess each) on generated faces, both stages; stage 2
    starts from the stage-1 run of the same precision. Epoch 1 pays one-off costs (loader start, autotuning).
    ``processes``: under torchrun with that many processes (NCCL on GPUs, gloo on CPUs), 0: one plain process."""
    size = get_arch(arch).image_size
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_train = steps_per_epoch * batch
        subprocess.run([sys.executable, "-m", "ceprompt", "make-demo-data", str(work / "data"), "--n-train",
                        str(n_train), "--n-test", str(batch), "--size", str(size)], check=True, capture_output=True)
        for precision in precisions:
            for stage, config in (("stage-1", "rafdb_stage1"), ("stage-2", "rafdb_stage2")):
                name = f"{stage}-{precision}"
                sets = [f"backbone.arch={arch}", "backbone.path=null", f"data.root={work / 'data'}",
                        "optim.epochs=2", f"optim.batch_size={batch}", "optim.warmup_epochs=0",
                        "run.final_eval=false", "run.eval_every=100", f"run.device={device}",
                        f"data.workers={8 if device.startswith('cuda') else 2}",
                        f"cat.prompt_depth={min(9, get_arch(arch).vision_layers)}"]
                cmd = ["-m", "ceprompt", "train", "--config", config, "--no-progress", "--precision", precision,
                       "--output-dir", str(work), "--name", name, *[a for s in sets for a in ("--set", s)]]
                if stage == "stage-2":
                    cmd += ["--init", str(work / f"stage-1-{precision}")]
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(processes)] if processes else [sys.executable]
                proc = subprocess.run(launcher + cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"ceprompt train ({name}) failed:\n{proc.stderr[-3000:]}")
                with open(work / name / "summary.csv", newline="") as fh:
                    out[f"{stage} {precision}"] = float(list(csv.DictReader(fh))[-1]["train_images_per_second"])
                if processes > 1:
                    log = (work / name / "train.log").read_text()
                    out[f"{stage} {precision} processes"] = processes if f"x {processes} process(es)" in log else 0
    return out


def serve_concurrent(model: torch.nn.Module, arch: str, device: str, clients: tuple[int, ...] = (1, 8),
                     per_client: int = 4, rounds: int = 2) -> dict[str, float]:
    """Requests per second of a real server (uvicorn on a local port, the app ``ceprompt serve`` runs, auto
    precision) with 1 and with 8 clients uploading at once, each client sending ``per_client`` face crops (PNG,
    ``detect=none``) one after the other; the client counts take turns. Also the faces per forward pass with the
    most clients: the server's batching window at work."""
    import socket
    import threading

    import httpx
    import uvicorn

    from ceprompt.server.app import create_app

    rec = recognizer(model, arch, device, "auto")
    batches: list[int] = []
    rec.model.register_forward_pre_hook(lambda module, args: batches.append(int(args[0].shape[0])))
    upload = face_crop_png(arch)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/api/predict?detect=none"

        def client(failures: list[str]) -> None:
            with httpx.Client(timeout=600) as http:
                for _ in range(per_client):
                    response = http.post(url, files={"file": ("face.png", upload, "image/png")})
                    if response.status_code != 200:
                        failures.append(response.text[:200])

        def requests_per_second(n: int) -> float:
            failures: list[str] = []
            workers = [threading.Thread(target=client, args=(failures,)) for _ in range(n)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            seconds = time.perf_counter() - start
            if failures:
                raise RuntimeError(f"the server answered {failures[0]}")
            return n * per_client / seconds

        requests_per_second(1)  # warm-up
        seen: dict[int, list[float]] = {n: [] for n in clients}
        for _ in range(rounds):
            for n in clients:
                batches.clear()
                seen[n].append(requests_per_second(n))
        out = {f"req/s, {n} client(s)": statistics.median(v) for n, v in seen.items()}
        out[f"faces per forward pass, {clients[-1]} clients"] = sum(batches) / max(len(batches), 1)
        out["precision"] = rec.precision
        return out
    finally:
        server.should_exit = True
        thread.join(timeout=30)
