"""The web app: one static page and a JSON API around a :class:`~ceprompt.api.Recognizer`.

The model is loaded once; requests are read concurrently but run through the model one at a time
(a lock), so results never mix and CPU threads are not oversubscribed. Uploads are limited in size
and must decode as images.
"""


import asyncio
import base64
import io
import logging
import threading
from importlib import resources
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..api import Recognizer
from ..drawing import explanation_image
from ..errors import CepromptError

log = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD = 10_000_000
ALLOWED_TYPES = ("image/", "application/octet-stream")


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(rec: Recognizer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD):  # type: ignore[no-untyped-def]
    """The FastAPI application (``pip install 'ceprompt[serve]'``)."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None

    app = FastAPI(
        title="ceprompt",
        description="Facial expression recognition with a trained CEPrompt model. "
                    "POST an image to /api/predict; every face comes back with its box and class probabilities.",
        version=rec.meta.get("ceprompt_version", "") or "0",
    )
    lock = threading.Lock()
    page = resources.files("ceprompt.server").joinpath("static/index.html").read_text()

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

    @app.get("/api/info", summary="The model being served")
    async def info() -> dict[str, Any]:
        return {"classes": rec.class_names, "stage": rec.meta.get("stage"), "checkpoint": str(rec.checkpoint),
                "input_size": rec.preprocess.image_size, "max_upload_bytes": max_upload_bytes,
                "face_detection": "MTCNN", "temperature": rec.temperature}

    @app.post("/api/predict", summary="Expressions of every face in an uploaded image")
    async def predict(
        request: Request,
        file: UploadFile = File(..., description="a JPEG, PNG, WebP, BMP or TIFF image"),
        detect: str = Query("mtcnn", pattern="^(mtcnn|none)$",
                            description="mtcnn: find faces; none: the image is one face crop"),
        explain: bool = Query(False, description="add a heat map of the evidence per face (PNG data URL)"),
    ) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload of {int(declared)} bytes exceeds the limit of {max_upload_bytes} bytes")
        if file.content_type and not file.content_type.startswith(ALLOWED_TYPES):
            raise HTTPException(415, f"{file.filename}: {file.content_type} is not an image")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{file.filename}: larger than the limit of {max_upload_bytes} bytes")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise HTTPException(415, f"{file.filename}: not a readable image ({exc})") from None
        faces = await asyncio.to_thread(run_model, image, detect, explain)
        return {"filename": file.filename, "width": image.width, "height": image.height,
                "classes": rec.class_names, "faces": faces}

    return app


def resolve_checkpoint(checkpoint: str | None, progress: bool = True) -> str:
    """The given checkpoint, or the demo model (trained once by the quick demo and cached)."""
    if checkpoint:
        return checkpoint
    from ..demo.pretrain import cache_dir

    served = cache_dir() / "demo" / "serve"
    best = served / "stage2" / "checkpoints" / "best.safetensors"
    if best.is_file():
        log.info("no checkpoint given: serving the demo model %s", best)
        return str(best)
    log.info("no checkpoint given: training the demo model once (ceprompt demo --quick) into %s", served)
    from ..demo.run import run_demo

    run_demo(served, quick=True, overwrite=True, progress=progress)
    return str(best)


def serve(checkpoint: str | None, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
          device: str = "auto") -> None:
    try:
        import uvicorn
    except ImportError:
        raise CepromptError("the web app needs FastAPI and uvicorn: pip install 'ceprompt[serve]'") from None
    from ..api import load

    rec = load(resolve_checkpoint(checkpoint), device=device)
    app = create_app(rec, max_upload_bytes)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    print(f"ceprompt serve: http://{host}:{port}/  (API docs at /docs, schema at /openapi.json)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
