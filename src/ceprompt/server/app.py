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
import functools
import io
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..api import Recognizer
from ..core.errors import CepromptError
from ..data.class_names import check_class_list
from ..data.images import ImageError, image_size, max_pixels, open_image
from ..verbs.drawing import explanation_image
from .guard import Guard
from .limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PIXEL_BUDGET,
    PixelBudget,
    RepeatFilter,
    guarded_protocol,
    release_memory,
    scaled_for_queue,
)

log = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD = 10_000_000
LARGE_IMAGE = 4_000_000  # pixels: after such an upload, freed memory goes back to the system
ALLOWED_TYPES = ("image/", "application/octet-stream")
MAX_CLASSES, MAX_CLASSES_TEXT = 64, 2000  # ?classes= per request: each new list runs the text tower once
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(rec: Recognizer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,  # type: ignore[no-untyped-def]
               pixel_budget: int = DEFAULT_PIXEL_BUDGET, class_aliases: Sequence[str] | None = None):
    """The FastAPI application (``pip install 'ceprompt[serve]'``); wrap it in :func:`guarded` to serve it.
    ``pixel_budget``: decoded pixels all requests may hold at once (:mod:`ceprompt.server.limits`)."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
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

    budget = PixelBudget(pixel_budget)

    @functools.lru_cache(maxsize=16)
    def recognizer_for(classes: tuple[str, ...] | None) -> Recognizer:  # on the model thread: text tower runs
        return rec if classes is None else rec.with_classes(classes, class_aliases)

    def run_model(image: Image.Image, detect: str, explain: bool, scale: float,
                  classes: tuple[str, ...] | None = None) -> tuple[Recognizer, list[dict[str, Any]]]:
        with lock:
            r = recognizer_for(classes)
            if explain:
                explanations = r.explain(image, detect=detect)
                faces = [{**e.face.to_dict(), "explanation_png": _png_data_url(explanation_image(e))}
                         for e in explanations]
            else:
                faces = [face.to_dict() for face in r.predict(image, detect=detect)]
        return r, [_in_upload_pixels(face, scale) for face in faces]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats each invalid input: for a file part without a filename, the whole upload
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": problems[:5]}, status_code=422)

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
        return {"classes": rec.class_names, "stage": rec.meta.get("stage"), "checkpoint": Path(str(rec.checkpoint)).name,
                "input_size": rec.preprocess.image_size, "max_upload_bytes": max_upload_bytes,
                "max_pixels": max_pixels(), "face_detection": "MTCNN", "temperature": rec.temperature,
                "notice": rec.notice}

    @app.post("/api/predict", summary="Expressions of every face in an uploaded image")
    async def predict(
        file: UploadFile = File(..., description="a JPEG, PNG, WebP, BMP or TIFF image"),
        detect: str = Query("mtcnn", pattern="^(mtcnn|none)$",
                            description="mtcnn: find faces; none: the image is one face crop"),
        explain: bool = Query(False, description="add a heat map of the evidence per face (PNG data URL)"),
        classes: str | None = Query(None, max_length=MAX_CLASSES_TEXT,
                                    description="comma-separated class names to score instead of the model's "
                                                "(names it was not trained for are scored from their words)"),
    ) -> dict[str, Any]:
        name = Path(file.filename or "upload").name
        wanted = None
        if classes is not None:
            try:
                wanted = tuple(check_class_list(classes.split(","), "classes"))
            except CepromptError as exc:
                raise HTTPException(422, str(exc)) from None
            if len(wanted) > MAX_CLASSES:
                raise HTTPException(422, f"classes: {len(wanted)} names; at most {MAX_CLASSES}")
        if file.content_type and not file.content_type.startswith(ALLOWED_TYPES):
            raise HTTPException(415, f"{name}: {file.content_type} is not an image")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the limit of {max_upload_bytes} bytes")
        try:
            width, height = await asyncio.to_thread(image_size, data, name)
        except ImageError as exc:
            raise _unreadable(exc, name) from None
        held = width * height
        if not budget.take(held):
            raise HTTPException(503, "busy with other uploads; try again in a moment",
                                headers={"Retry-After": "2"})
        try:
            try:
                image, scale = await asyncio.to_thread(lambda: scaled_for_queue(open_image(data, name)))
            except ImageError as exc:
                raise _unreadable(exc, name) from None
            budget.give(held - image.width * image.height)  # what waits for the model is the scaled copy
            held = image.width * image.height
            try:
                used, faces = await asyncio.get_running_loop().run_in_executor(model_thread, run_model, image,
                                                                               detect, explain, scale, wanted)
            except CepromptError as exc:
                raise HTTPException(422, f"{name}: {exc}") from None
        finally:
            budget.give(held)
            image = None
            if width * height > LARGE_IMAGE:
                await asyncio.to_thread(release_memory)
        response: dict[str, Any] = {"filename": name, "width": width, "height": height,
                                    "classes": used.class_names, "faces": faces}
        if rec.notice:
            response["notice"] = rec.notice
        if used.classes_note:
            response["classes_note"] = used.classes_note
        return response

    return app


def _unreadable(exc: ImageError, name: str) -> Exception:
    from fastapi import HTTPException

    detail = str(exc).removeprefix(f"{name}: ")
    if "over the limit" in detail:
        return HTTPException(413, f"{name}: {detail}")
    return HTTPException(415, f"{name}: not a readable image {detail.removeprefix('cannot decode image ')}")


def _in_upload_pixels(face: dict[str, Any], scale: float) -> dict[str, Any]:
    """A face found on the scaled copy, with box and landmarks in the upload's own pixels."""
    if scale == 1.0:
        return face
    box = [round(v * scale, 2) for v in face["box"]]
    landmarks = [[x * scale, y * scale] for x, y in face["landmarks"]] if face.get("landmarks") else None
    return {**face, "box": box, "landmarks": landmarks}


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
          allow_hosts: list[str] | tuple[str, ...] = (), precision: str = "auto", min_face: Any = None,
          pixel_budget: int = DEFAULT_PIXEL_BUDGET, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          header_timeout: float = DEFAULT_HEADER_TIMEOUT, keep_alive: float = DEFAULT_KEEP_ALIVE,
          classes: Sequence[str] | None = None, class_aliases: Sequence[str] | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None
    from ..api import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the model's notice is logged below, once
        options = {} if min_face is None else {"min_face_size": min_face}
        rec = load(resolve_checkpoint(checkpoint), device=device, precision=precision, classes=classes,
                   class_aliases=class_aliases, **options)
    app = guarded(create_app(rec, max_upload_bytes, pixel_budget, class_aliases), host, max_upload_bytes,
                  allow_origins, allow_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    if rec.notice:
        log.warning("%s", rec.notice)
    print(f"ceprompt serve: http://{host}:{port}/  (API docs at /docs, schema at /openapi.json)", flush=True)
    repeats = RepeatFilter()
    for name in ("asyncio", "uvicorn.error", "ceprompt.server"):
        logging.getLogger(name).addFilter(repeats)
    max_connections = min(max_connections, _descriptor_room())
    uvicorn.run(app, host=host, port=port, log_level="info", http=guarded_protocol(max_connections, header_timeout),
                limit_concurrency=max_connections, timeout_keep_alive=keep_alive)


def _descriptor_room() -> int:
    """Connections that fit in this process's file-descriptor limit, with room for the model's own files."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return DEFAULT_MAX_CONNECTIONS
    return max(8, (soft - 64) // 2) if soft > 0 else DEFAULT_MAX_CONNECTIONS
