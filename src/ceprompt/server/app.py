"""The web app: one static page and a JSON API around a :class:`~ceprompt.api.Recognizer`.

The model is loaded once; requests are read concurrently but run through the model one at a time
(a lock), so results never mix and CPU threads are not oversubscribed. Images are decoded off the
event loop and outside the model lock, through the one image opener (pixel limit from the header).
What may reach the app at all is decided by :class:`~ceprompt.server.guard.Guard`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime, and
# UploadFile is imported inside create_app.
import asyncio
import base64
import io
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from ..api import Recognizer
from ..core.errors import CepromptError
from ..data.images import ImageError, max_pixels, open_image
from ..verbs.drawing import explanation_image
from .guard import Guard

log = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD = 10_000_000
ALLOWED_TYPES = ("image/", "application/octet-stream")
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(rec: Recognizer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD):  # type: ignore[no-untyped-def]
    """The FastAPI application (``pip install 'ceprompt[serve]'``); wrap it in :func:`guarded` to serve it."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, UploadFile
        from fastapi.responses import HTMLResponse, Response
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None

    app = FastAPI(
        title="ceprompt",
        description="Facial expression recognition with a trained CEPrompt model. "
                    "POST an image to /api/predict; every face comes back with its box and class probabilities.",
        version=rec.meta.get("ceprompt_version", "") or "0",
    )
    lock = threading.Lock()
    # The model always runs on this one thread: torch's OpenMP pool belongs to the thread that calls it, and a
    # model hopping between the event loop's worker threads left the previous pool spinning beside the next one
    # (a third more time per request at batch 1).
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ceprompt-model")
    static = resources.files("ceprompt.server").joinpath("static")
    page = static.joinpath("index.html").read_text()
    assets = {name: static.joinpath(name).read_bytes() for name in STATIC}

    def run_model(image: Image.Image, detect: str, explain: bool) -> list[dict[str, Any]]:
        with lock:
            if explain:
                explanations = rec.explain(image, detect=detect)
                return [{**e.face.to_dict(), "explanation_png": _png_data_url(explanation_image(e))}
                        for e in explanations]
            return [face.to_dict() for face in rec.predict(image, detect=detect)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # browsers ask for it whatever the page says; no 404 in every log
        return Response(assets["favicon.svg"], media_type=STATIC["favicon.svg"])

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "not found")
        return Response(assets[name], media_type=STATIC[name])

    @app.get("/api/info", summary="The model being served")
    async def info() -> dict[str, Any]:
        return {"classes": rec.class_names, "stage": rec.meta.get("stage"), "checkpoint": str(rec.checkpoint),
                "input_size": rec.preprocess.image_size, "max_upload_bytes": max_upload_bytes,
                "max_pixels": max_pixels(), "face_detection": "MTCNN", "temperature": rec.temperature,
                "notice": rec.notice}

    @app.post("/api/predict", summary="Expressions of every face in an uploaded image")
    async def predict(
        file: UploadFile = File(..., description="a JPEG, PNG, WebP, BMP or TIFF image"),
        detect: str = Query("mtcnn", pattern="^(mtcnn|none)$",
                            description="mtcnn: find faces; none: the image is one face crop"),
        explain: bool = Query(False, description="add a heat map of the evidence per face (PNG data URL)"),
    ) -> dict[str, Any]:
        name = Path(file.filename or "upload").name
        if file.content_type and not file.content_type.startswith(ALLOWED_TYPES):
            raise HTTPException(415, f"{name}: {file.content_type} is not an image")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the limit of {max_upload_bytes} bytes")
        try:
            image = await asyncio.to_thread(open_image, data, name)
        except ImageError as exc:
            detail = str(exc).removeprefix(f"{name}: ")
            if "over the limit" in detail:
                raise HTTPException(413, f"{name}: {detail}") from None
            raise HTTPException(415, f"{name}: not a readable image {detail.removeprefix('cannot decode image ')}"
                                ) from None
        try:
            faces = await asyncio.get_running_loop().run_in_executor(model_thread, run_model, image, detect, explain)
        except CepromptError as exc:
            raise HTTPException(422, f"{name}: {exc}") from None
        response: dict[str, Any] = {"filename": name, "width": image.width, "height": image.height,
                                    "classes": rec.class_names, "faces": faces}
        if rec.notice:
            response["notice"] = rec.notice
        return response

    return app


def guarded(app: Any, host: str, max_upload_bytes: int, allow_origins: list[str] | tuple[str, ...] = (),
            allow_hosts: list[str] | tuple[str, ...] = ()) -> Guard:
    return Guard(app, host, max_upload_bytes, allow_origins, allow_hosts)


def resolve_checkpoint(checkpoint: str | None, progress: bool = True) -> str:
    """The given checkpoint; else the user's own demo run (``runs/demo``), else the cached demo model
    (trained once by the quick demo)."""
    if checkpoint:
        return checkpoint
    from ..core.io_utils import cache_dir

    own = Path("runs") / "demo" / "stage2" / "checkpoints" / "best.safetensors"
    if own.is_file():
        log.info("no checkpoint given: serving your demo model %s (from `ceprompt demo`)", own)
        return str(own)
    served = cache_dir() / "demo" / "serve"
    best = served / "stage2" / "checkpoints" / "best.safetensors"
    if best.is_file():
        log.info("no checkpoint given: serving the cached demo model %s", best)
        return str(best)
    log.info("no checkpoint given: training the demo model once (ceprompt demo --quick) into %s", served)
    from ..demo.run import run_demo

    run_demo(served, quick=True, overwrite=True, progress=progress)
    return str(best)


def serve(checkpoint: str | None, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
          device: str = "auto", allow_origins: list[str] | tuple[str, ...] = (),
          allow_hosts: list[str] | tuple[str, ...] = (), precision: str = "auto", min_face: Any = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None
    from ..api import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the model's notice is logged below, once
        options = {} if min_face is None else {"min_face_size": min_face}
        rec = load(resolve_checkpoint(checkpoint), device=device, precision=precision, **options)
    app = guarded(create_app(rec, max_upload_bytes), host, max_upload_bytes, allow_origins, allow_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    if rec.notice:
        log.warning("%s", rec.notice)
    print(f"ceprompt serve: http://{host}:{port}/  (API docs at /docs, schema at /openapi.json)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
