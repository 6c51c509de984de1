"""The web app: one static page (photos and a live camera), a JSON API and a WebSocket around a
:class:`~ceprompt.api.Recognizer`.

The model is loaded once and runs on one thread (:mod:`.worker`), where requests that wait together share a forward
pass, so results never mix and CPU threads are not oversubscribed. Images are decoded off the event loop and off the
model's thread, through the one image opener (pixel limit from the header). What may reach the app at all is decided
by :class:`~ceprompt.server.guard.Guard`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime, and
# UploadFile is imported inside create_app.
import asyncio
import base64
import contextlib
import io
import logging
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from PIL import Image

from ..api import Recognizer
from ..core.errors import CepromptError
from ..core.extras import DETECTORS
from ..core.extras import missing as extras_missing
from ..data.class_names import check_class_list
from ..data.images import ImageError, max_pixels
from ..verbs.drawing import explanation_image
from .guard import Guard
from .limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PIXEL_BUDGET,
    Busy,
    PixelBudget,
    RepeatFilter,
    admitted,
    guarded_protocol,
)
from .live import DEFAULT_IDLE, DEFAULT_MAX_FPS, DEFAULT_MAX_SECONDS, MAX_LIVE_SIDE, LiveSession
from .worker import DEFAULT_MAX_FACES, DEFAULT_WINDOW, Answer, Job, ModelWorker

log = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD = 10_000_000
ALLOWED_TYPES = ("image/", "application/octet-stream")
MAX_CLASSES, MAX_CLASSES_TEXT = 64, 2000  # ?classes= per request: each new list runs the text tower once
MAX_EXPLAINED = 16  # faces of an answer with an explanation picture (each is tens of kilobytes)
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(rec: Recognizer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,  # type: ignore[no-untyped-def]
               pixel_budget: int = DEFAULT_PIXEL_BUDGET, class_aliases: Sequence[str] | None = None,
               max_faces: int = DEFAULT_MAX_FACES, batch_window: float = DEFAULT_WINDOW,
               live_idle: float = DEFAULT_IDLE, live_max_seconds: float = DEFAULT_MAX_SECONDS):
    """The FastAPI application (``pip install 'ceprompt[serve]'``); wrap it in :func:`guarded` to serve it.
    ``pixel_budget``: decoded pixels all requests may hold at once (:mod:`ceprompt.server.limits`); ``max_faces``:
    faces classified per image; ``batch_window``: seconds a request may wait for others to share its forward pass."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile, WebSocket
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None

    worker = ModelWorker(rec, class_aliases, window=batch_window, max_faces=max_faces)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(
        lifespan=lifespan,
        title="ceprompt",
        description="Facial expression recognition with a trained CEPrompt model. "
                    "POST an image to /api/predict; every face comes back with its box and class probabilities. "
                    "/api/live is the live camera's WebSocket.",
        version=rec.meta.get("ceprompt_version", "") or "0",
    )
    app.state.worker, app.state.live_sessions = worker, 0
    static = resources.files("ceprompt.server").joinpath("static")
    page = static.joinpath("index.html").read_text()
    assets = {name: static.joinpath(name).read_bytes() for name in STATIC}
    budget = PixelBudget(pixel_budget)

    def wanted_classes(classes: str | None) -> tuple[str, ...] | None:
        if classes is None:
            return None
        try:
            wanted = tuple(check_class_list(classes.split(","), "classes"))
        except CepromptError as exc:
            raise HTTPException(422, str(exc)[:300]) from None
        if len(wanted) > MAX_CLASSES:
            raise HTTPException(422, f"classes: {len(wanted)} names; at most {MAX_CLASSES}")
        return wanted

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats each invalid input: for a file part without a filename, the whole upload
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": problems[:5]}, status_code=422)

    @app.exception_handler(MemoryError)
    async def out_of_memory(request: Request, exc: MemoryError) -> JSONResponse:
        return JSONResponse({"detail": "the server is short of memory right now; try again in a moment"},
                            status_code=503, headers={"Retry-After": "5"})

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
                "max_pixels": max_pixels(), "max_faces": max_faces, "max_explained": MAX_EXPLAINED,
                "face_detection": [name for name, needs in DETECTORS.items()
                                   if name != "none" and not extras_missing(needs)],
                "temperature": rec.temperature, "notice": rec.notice,
                "live": {"max_fps": DEFAULT_MAX_FPS, "max_side": MAX_LIVE_SIDE, "idle_seconds": live_idle,
                         "sessions": app.state.live_sessions},
                "batching": {"window_seconds": batch_window, "requests": sum(worker.batches),
                             "forward_passes": len(worker.batches)}}

    @app.post("/api/predict", summary="Expressions of every face in an uploaded image")
    async def predict(
        file: UploadFile = File(..., description="a JPEG, PNG, WebP, BMP or TIFF image"),
        detect: str = Query("mtcnn", pattern=f"^({'|'.join(DETECTORS)})$",
                            description="mtcnn or centerface: find faces with that detector; none: the image is "
                                        "one face crop"),
        explain: bool = Query(False, description="add a heat map of the evidence per face (PNG data URL)"),
        classes: str | None = Query(None, max_length=MAX_CLASSES_TEXT,
                                    description="comma-separated class names to score instead of the model's "
                                                "(names it was not trained for are scored from their words)"),
    ) -> dict[str, Any]:
        with worker.arriving() as arrival:
            return await answer_upload(arrival, file, detect, explain, classes)

    async def answer_upload(arrival: Any, file: Any, detect: str, explain: bool, classes: str | None
                            ) -> dict[str, Any]:
        name = Path(file.filename or "upload").name[:200]
        wanted = wanted_classes(classes)
        if file.content_type and not file.content_type.startswith(ALLOWED_TYPES):
            raise HTTPException(415, f"{name}: {file.content_type} is not an image")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the limit of {max_upload_bytes} bytes")
        try:
            async with admitted(budget, data, name) as upload:
                try:
                    answer = await arrival.run(Job(upload.image, detect, explain, wanted))
                except CepromptError as exc:
                    raise HTTPException(422, f"{name}: {exc}") from None
                faces = await asyncio.to_thread(_face_records, answer, explain, upload.scale)
        except ImageError as exc:
            raise _unreadable(exc, name) from None
        except Busy:
            raise HTTPException(503, "busy with other uploads; try again in a moment",
                                headers={"Retry-After": "2"}) from None
        used = answer.recognizer
        response: dict[str, Any] = {"filename": name, "width": upload.width, "height": upload.height,
                                    "classes": used.class_names, "faces": faces}
        if answer.left_out:
            response["faces_left_out"] = answer.left_out
        if rec.notice:
            response["notice"] = rec.notice
        if used.classes_note:
            response["classes_note"] = used.classes_note
        return response

    @app.websocket("/api/live")
    async def live(websocket: WebSocket, classes: str | None = None) -> None:
        try:
            wanted = wanted_classes(classes)
        except HTTPException as exc:
            await websocket.close(code=1008, reason=str(exc.detail)[:120])
            return
        await websocket.accept()
        app.state.live_sessions += 1
        try:
            await LiveSession(websocket, worker, budget, wanted, max_upload_bytes, live_idle, live_max_seconds).run()
        finally:
            app.state.live_sessions -= 1

    return app


def _face_records(answer: Answer, explain: bool, scale: float) -> list[dict[str, Any]]:
    """The answer's faces as JSON records in the upload's pixels (with explain: the first :data:`MAX_EXPLAINED`
    with their picture)."""
    if not explain:
        return [_in_upload_pixels(face.to_dict(), scale) for face in answer.faces]
    out = []
    for i, expl in enumerate(answer.faces):
        record = expl.face.to_dict()
        if i < MAX_EXPLAINED:
            record["explanation_png"] = _png_data_url(explanation_image(expl))
        out.append(_in_upload_pixels(record, scale))
    return out


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
          classes: Sequence[str] | None = None, class_aliases: Sequence[str] | None = None,
          max_faces: int = DEFAULT_MAX_FACES, per_client: int | None = None,
          batch_window: float = DEFAULT_WINDOW, threads: int | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None
    from ..api import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the model's notice is logged below, once
        options = {} if min_face is None else {"min_face_size": min_face}
        rec = load(resolve_checkpoint(checkpoint), device=device, precision=precision, classes=classes,
                   class_aliases=class_aliases, threads=threads, **options)
    app = guarded(create_app(rec, max_upload_bytes, pixel_budget, class_aliases, max_faces, batch_window), host,
                  max_upload_bytes, allow_origins, allow_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    if rec.notice:
        log.warning("%s", rec.notice)
    print(f"ceprompt serve: http://{host}:{port}/  (API docs at /docs, schema at /openapi.json)", flush=True)
    repeats = RepeatFilter()
    for name in ("asyncio", "uvicorn.error", "ceprompt.server"):
        logging.getLogger(name).addFilter(repeats)
    max_connections = min(max_connections, _descriptor_room())
    http, ws = guarded_protocol(max_connections, header_timeout, per_client)
    uvicorn.run(app, host=host, port=port, log_level="info", http=http, ws=ws, limit_concurrency=max_connections,
                timeout_keep_alive=keep_alive, ws_max_size=max_upload_bytes + 64)


def _descriptor_room() -> int:
    """Connections that fit in this process's file-descriptor limit, with room for the model's own files."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return DEFAULT_MAX_CONNECTIONS
    return max(8, (soft - 64) // 2) if soft > 0 else DEFAULT_MAX_CONNECTIONS
