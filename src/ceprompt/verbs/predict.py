"""``ceprompt predict``: expressions of every face in images, folders and videos.

Output: one row per face (CSV or JSON lines): path, frame (videos), face index, box, label, score,
one probability per class, detector confidence, and an ``error`` column. A file that cannot be
read gets one row with its error and the run goes on; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from ..api import Explanation, FaceResult, Recognizer
from ..core.errors import CepromptError, ConfigError
from ..core.io_utils import spreadsheet_safe
from ..core.paths import file_stem, output_dir, output_file
from ..core.ranges import POSITIVE_INT, check
from ..data.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, max_pixels
from .drawing import annotate, explanation_image, save_png

log = logging.getLogger(__name__)
# Encoder per annotated-video container (the source's own suffix is kept); webm takes only VP8/VP9/AV1.
VIDEO_CODECS = {".webm": "libvpx"}
DEFAULT_VIDEO_CODEC = "mpeg4"


def expand_inputs(paths: Sequence[str], suffixes: frozenset[str] = IMAGE_SUFFIXES | VIDEO_SUFFIXES
                  ) -> list[Path]:
    """Files as given (any suffix: unsupported ones become error rows) and, searched recursively, the files of
    folders that have one of ``suffixes``."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes))
        else:
            out.append(p)
    return out


@dataclass
class PredictPlan:
    """Inputs and outputs of a predict run, all checked before the model is loaded."""

    files: list[Path]
    output: Path | None  # None: stdout
    fmt: str
    annotate_dir: Path | None
    explain_dir: Path | None
    video_stride: int


def plan_predict(inputs: Sequence[str], output: str = "-", fmt: str | None = None, annotate_dir: str | None = None,
                 explain_dir: str | None = None, video_stride: int = 5, overwrite: bool = False) -> PredictPlan:
    check("--video-stride", video_stride, POSITIVE_INT)
    fmt = fmt or ("jsonl" if output.endswith((".jsonl", ".json")) else "csv")
    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"--format {fmt!r}: expected csv or jsonl")
    files = expand_inputs(inputs)
    if not files:
        raise ConfigError(f"no images or videos found in {list(inputs)}")
    out = None if output == "-" else output_file(output, overwrite, "--output")
    # pictures are named after the inputs: a folder with files in it could hold an earlier run's, which this run
    # would replace one by one
    ann = output_dir(annotate_dir, "--annotate", must_be_empty=True, overwrite=overwrite) if annotate_dir else None
    expl = output_dir(explain_dir, "--explain", must_be_empty=True, overwrite=overwrite) if explain_dir else None
    return PredictPlan(files, out, fmt, ann, expl, video_stride)


@dataclass
class Row:
    path: str
    frame: int | None
    face: int | None
    result: FaceResult | None
    error: str = ""


class Writer:
    """CSV or JSON lines, to a file or stdout."""

    def __init__(self, fh: IO[str], fmt: str, class_names: Sequence[str]) -> None:
        self.fh, self.fmt, self.class_names = fh, fmt, list(class_names)
        self.columns = ["path", "frame", "face", "x0", "y0", "x1", "y1", "label", "score",
                        *[f"prob_{c}" for c in self.class_names], "detector_confidence", "error"]
        self.csv = csv.writer(fh) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow([spreadsheet_safe(c) for c in self.columns])

    def write(self, row: Row) -> None:
        r = row.result
        record: dict[str, Any] = {"path": row.path, "frame": row.frame, "face": row.face}
        if r is not None:
            record.update(zip(("x0", "y0", "x1", "y1"), r.box))
            record.update(label=r.label, score=round(r.score, 6))
            record.update({f"prob_{c}": round(r.probabilities[c], 6) for c in self.class_names})
            record["detector_confidence"] = None if r.detector_confidence is None else round(r.detector_confidence, 6)
        record["error"] = row.error
        if self.csv:
            self.csv.writerow(["" if record.get(c) is None else spreadsheet_safe(record.get(c)) for c in self.columns])
        else:
            if r is not None:
                record["landmarks"] = r.landmarks
            self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()


def _video_frames(path: Path, stride: int, every_frame: bool) -> Iterator[tuple[int, Image.Image, bool, Any]]:
    """(index, frame, sampled, rate): every ``stride``-th frame is ``sampled``; the others are decoded (the
    codec needs them) but only converted to images when ``every_frame`` (annotated videos)."""
    try:
        import av
    except ImportError:
        raise CepromptError("reading videos needs PyAV: pip install 'ceprompt[video]'") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CepromptError("no video stream")
            stream = container.streams.video[0]
            width, height, limit = stream.codec_context.width or 0, stream.codec_context.height or 0, max_pixels()
            if width * height > limit:  # the same limit as for images, from the header, before any frame
                raise CepromptError(f"{width}x{height} frames are {width * height:,} pixels, over the limit of "
                                    f"{limit:,} (raise it with --max-pixels or $CEPROMPT_MAX_PIXELS)")
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            for i, frame in enumerate(container.decode(video=0)):
                sampled = i % stride == 0
                if sampled or every_frame:
                    yield i, frame.to_image(), sampled, rate
    except CepromptError:
        raise
    except Exception as exc:  # PyAV raises its own error types for undecodable input
        raise CepromptError(f"cannot decode video ({str(exc).splitlines()[0][:160]})") from None


class VideoWriter:
    """Annotated frames at the source's frame rate, in a container of the source's type."""

    def __init__(self, path: Path) -> None:
        import av

        self.path = path
        self.container = av.open(str(path), mode="w")
        self.stream = None

    def write(self, image: Image.Image, rate: Any) -> None:
        import av

        if self.stream is None:
            codec = VIDEO_CODECS.get(self.path.suffix.lower(), DEFAULT_VIDEO_CODEC)
            self.stream = self.container.add_stream(codec, rate=Fraction(rate).limit_denominator(65535))
            self.stream.width, self.stream.height = image.width - image.width % 2, image.height - image.height % 2
            self.stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_image(image.crop((0, 0, self.stream.width, self.stream.height)))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


def _stem(root_index: int, path: Path) -> str:
    return f"{root_index:05d}_{file_stem(path.stem)}"


def _open_output(plan: PredictPlan) -> IO[str]:
    # File names that are not UTF-8 (bytes kept by Python as surrogates) are written back as the same bytes.
    if plan.output is None:
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        return sys.stdout
    return open(plan.output, "w", newline="", encoding="utf-8", errors="surrogateescape")


def run_predict(rec: Recognizer, plan: PredictPlan, detect: str = "mtcnn", batch_size: int = 32,
                progress: bool = True) -> int:
    """Predict over the plan's files; returns the number of files that failed."""
    check("--batch-size", batch_size, POSITIVE_INT)
    existed = plan.output is not None and plan.output.exists()
    try:
        fh = _open_output(plan)
        return _predict_all(rec, plan, fh, detect, batch_size, progress)
    except OSError as exc:  # a full disk, a closed pipe: one line, and no partial file left to block a rerun
        if plan.output is not None and not existed:
            plan.output.unlink(missing_ok=True)
        where = plan.output or "standard output"
        raise CepromptError(f"{where}: cannot write the results ({exc.strerror or exc})") from None


def _predict_all(rec: Recognizer, plan: PredictPlan, fh: IO[str], detect: str, batch_size: int,
                 progress: bool) -> int:
    files = plan.files
    writer = Writer(fh, plan.fmt, rec.class_names)
    failed = 0
    bar = tqdm(total=len(files), disable=not progress, unit="file", desc="predict", dynamic_ncols=True, file=sys.stderr)
    pending: list[tuple[int, Path, Image.Image]] = []  # images waiting to be classified together

    def fail(path: Path, exc: CepromptError) -> None:
        nonlocal failed
        failed += 1
        writer.write(Row(str(path), None, None, None, error=str(exc).removeprefix(f"{path}: ")))
        log.warning("%s", str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")

    def explain_or_error(image: Image.Image) -> list[Explanation] | CepromptError:
        try:
            return rec.explain(image, detect=detect)
        except CepromptError as exc:
            return exc

    def flush() -> None:
        images = [im for _, _, im in pending]
        if plan.explain_dir:  # an explanation carries its face's result: detect and score each image once
            explained = [explain_or_error(im) for im in images]
            found = [e if isinstance(e, CepromptError) else [x.face for x in e] for e in explained]
        else:
            found = rec.predict_batch(images, detect, batch_size, on_error="return")
            explained = [[] for _ in images]
        for (index, path, image), results, expl in zip(pending, found, explained):
            try:
                if isinstance(results, CepromptError):
                    raise results
                _write_image(rec, index, path, image, results, expl, writer, plan)
            except CepromptError as exc:
                fail(path, exc)
        bar.update(len(pending))
        pending.clear()

    try:
        for index, path in enumerate(files):
            suffix = path.suffix.lower()
            try:
                if not path.is_file():
                    raise CepromptError("no such file" if not path.exists() else "not a regular file")
                if suffix in IMAGE_SUFFIXES:
                    pending.append((index, path, rec.load_image(path)))
                    if len(pending) >= batch_size:
                        flush()
                    continue
                if suffix not in VIDEO_SUFFIXES:
                    raise CepromptError(f"unsupported file type {suffix or '(none)'}; expected an image "
                                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) or a video "
                                        f"({', '.join(sorted(VIDEO_SUFFIXES))})")
                _predict_video(rec, index, path, writer, detect, plan)
            except CepromptError as exc:
                fail(path, exc)
            bar.update(1)
        flush()
    finally:
        bar.close()
        if fh is not sys.stdout:
            fh.close()
    return failed


def _save(image: Image.Image, path: Path) -> None:
    try:
        save_png(image, path)
    except OSError as exc:
        raise CepromptError(f"cannot write {path} ({exc.strerror or exc})") from None


def _write_image(rec: Recognizer, index: int, path: Path, image: Image.Image, results: list[FaceResult],
                 explanations: list[Explanation], writer: Writer, plan: PredictPlan) -> None:
    if not results:
        writer.write(Row(str(path), None, None, None))  # no face: a row with empty fields, not an error
    for j, r in enumerate(results):
        writer.write(Row(str(path), None, j, r))
    if plan.annotate_dir:
        _save(annotate(image, results, rec.class_names), plan.annotate_dir / f"{_stem(index, path)}.png")
    if plan.explain_dir:
        for j, expl in enumerate(explanations):
            _save(explanation_image(expl), plan.explain_dir / f"{_stem(index, path)}_face{j}.png")


def _predict_video(rec: Recognizer, index: int, path: Path, writer: Writer, detect: str, plan: PredictPlan) -> None:
    target = plan.annotate_dir / f"{_stem(index, path)}{path.suffix.lower()}" if plan.annotate_dir else None
    video = None
    latest: list[FaceResult] = []
    any_face = False
    try:
        for i, frame, sampled, rate in _video_frames(path, plan.video_stride, every_frame=target is not None):
            if sampled:
                latest = rec.predict(frame, detect=detect)
                any_face = any_face or bool(latest)
                for j, r in enumerate(latest):
                    writer.write(Row(str(path), i, j, r))
            if target is not None:
                video = video or VideoWriter(target)
                video.write(annotate(frame, latest, rec.class_names), rate)
    finally:
        if video is not None:
            video.close()
    if not any_face:
        writer.write(Row(str(path), None, None, None))  # like an image without faces: one empty row
