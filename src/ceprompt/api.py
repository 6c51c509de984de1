"""The Python API: load a trained checkpoint, recognise the expression of every face in an image.

    import ceprompt
    rec = ceprompt.load("runs/rafdb-stage2")           # a run directory or a .safetensors checkpoint
    for face in rec.predict("group_photo.jpg"):         # path, PIL image or numpy array
        print(face.box, face.label, face.probabilities)

Faces are found by MTCNN (``pip install 'ceprompt[face]'``) and cut by the same policy as the
training crops (:mod:`ceprompt.data.faces`); ``detect="none"`` takes each image as one face crop.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .core.errors import CepromptError, ConfigError
from .core.extras import DETECTORS
from .core.ranges import POSITIVE_INT, THREADS, check
from .core.runtime import DTYPES, autocast, resolve_device, resolve_precision
from .core.schema import read_json
from .data.class_names import ClassMatch, match_classes, parse_aliases
from .data.faces import (
    DEFAULT_EXPAND,
    DEFAULT_MIN_FACE,
    DetectedFace,
    FaceDetector,
    MinFace,
    align_face,
    to_pil,
    whole_image_face,
)
from .data.images import open_image
from .engine.threads import RECHECK_SECONDS, ThreadGovernor
from .model.head import ScoreOutput, patch_class_similarity
from .model.towers import store_block_matrices
from .video.decode import Frame, VideoError, VideoReader
from .video.tracking import DEFAULT_MEMORY, DEFAULT_SMOOTH, FaceTracks, FrameRecord
from .weights.build import LoadedModel, load_trained

ImageInput = str | os.PathLike | Image.Image | np.ndarray
DETECT_MODES = tuple(DETECTORS)  # mtcnn (default), centerface, none
NOT_FINITE = ("the model's scores for a face in this image are not finite (inf or NaN): its weights or normalisation "
              "values are out of range")


@dataclass
class FaceResult:
    """One face: where it is and what expression it shows."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the input image's pixels
    landmarks: list[tuple[float, float]] | None  # eyes, nose, mouth corners (MTCNN); None without detection
    detector_confidence: float | None
    label: str  # the most probable class
    score: float  # its probability
    probabilities: dict[str, float]  # every class, summing to 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaceEmbedding:
    """One face's image embedding."""

    image: int  # index of the image among those given
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in that image's pixels
    embedding: np.ndarray  # (D,) float32, unit length
    label: str  # the predicted class


@dataclass
class Explanation:
    face: FaceResult
    crop: Image.Image  # the face as the model saw it
    heatmap: np.ndarray  # (grid, grid) patch similarity to the predicted class, in [0, 1]
    top_patches: list[int]  # indices of the top-k patches behind the local score


class Recognizer:
    """A trained CEPrompt model with its preprocessing, ready for images.

    A recognizer is safe to share between threads: nothing is written to its model after loading, and
    :meth:`with_classes` returns a new recognizer (sharing the model's weights and the face detector) with its own
    class names and class text embeddings. It owns ``loaded.model``: under bf16 or fp16 the vision blocks' weights
    are kept in that dtype (give each recognizer of another precision its own model)."""

    def __init__(self, loaded: LoadedModel, device: str = "auto", precision: str = "auto",
                 detector_threshold: float | None = None, min_face_size: MinFace | str | int = DEFAULT_MIN_FACE,
                 expand: float = DEFAULT_EXPAND, classes: Sequence[str] | None = None,
                 class_aliases: Sequence[str] | None = None, threads: int | None = None) -> None:
        """``detector_threshold``: the face detector's confidence threshold (None: the detector's own default,
        MTCNN 0.9, CenterFace 0.5). ``min_face_size``: the smallest face searched for, in pixels (``20`` or ``"20px"``), as a share of
        the image's shorter side (``"2%"``) or the larger of both (``"20px,2%"``, the default).

        ``classes``: score exactly these classes, named as given (default: the trained ones). A name that
        matches a trained class (by name or alias, ``class_aliases`` entries ``ALIAS=CLASS`` adding to the
        built-in table) uses that class's trained prompt; any other is scored from its own words.

        ``threads``: CPU threads for detection and the model (default: the cores other processes leave free,
        re-checked before each batch at most every 2 s, since one face at a time on a busy machine runs several
        times slower on a thread that shares its core; ``OMP_NUM_THREADS`` fixes it too)."""
        self.device = resolve_device(device)
        threads = None if threads is None else check("threads", threads, THREADS)
        self._threads = ThreadGovernor(threads, every=RECHECK_SECONDS) if self.device.type == "cpu" else None
        self.precision = resolve_precision(precision, self.device)
        self.model = loaded.model.to(self.device).eval()
        if self.precision != "fp32":  # the recognizer owns its model: blocks keep the autocast dtype's weights
            store_block_matrices(self.model.clip.visual.transformer.resblocks, DTYPES[self.precision])
        self.meta = loaded.meta
        self.checkpoint = loaded.path
        self.preprocess = loaded.preprocess
        self.expand = expand
        # What a user must know about this model, e.g. "learned drawn faces only" for the demo's.
        self.notice: str | None = self.meta.get("notice") or None
        self._resize = self.preprocess.resize()
        self._detector_args = (detector_threshold, MinFace.parse(min_face_size, "min_face_size"))
        self._shared = _SharedDetector()
        self.class_names = list(loaded.class_names)
        self.class_match: ClassMatch | None = None
        # Said with every result when the classes are not the trained ones (unseen names, no fitted temperature).
        self.classes_note: str | None = None
        self.temperature = self._fitted_temperature()
        parse_aliases(class_aliases, "class_aliases")  # a malformed entry is refused even when no classes use it
        if classes is not None:
            self._set_classes(classes, class_aliases)
        else:
            self.text_features = self._text_features(self.model.classes.words)  # once, not per image

    def with_classes(self, classes: Sequence[str], class_aliases: Sequence[str] | None = None) -> "Recognizer":
        """This recognizer scoring ``classes`` instead: a new recognizer sharing the model and the face detector;
        this one is left as it is."""
        other = copy.copy(self)
        other._set_classes(classes, class_aliases)
        return other

    def _fitted_temperature(self) -> float:
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @torch.no_grad()
    def _text_features(self, words: Sequence[str]) -> torch.Tensor:
        with self._autocast():
            return self.model.text_features(words).float()

    def _set_classes(self, classes: Sequence[str], aliases: Sequence[str] | None) -> None:
        """Only for a recognizer not yet shared (being constructed or copied): its own classes and their text."""
        classes_of = self.model.classes
        match = match_classes(classes, classes_of.names, classes_of.words, aliases)
        self.text_features = self._text_features(match.words)
        self.class_names, self.class_match = list(match.targets), match
        self.temperature = self._fitted_temperature()
        self.classes_note = None
        unseen = [name for name, seen in zip(match.targets, match.seen) if not seen]
        if unseen:
            self.temperature = 1.0  # fitted for the trained classes only
            listed = ", ".join(unseen)
            self.classes_note = (f"{'classes' if len(unseen) > 1 else 'class'} {listed} "
                                 f"{'were' if len(unseen) > 1 else 'was'} not trained: scored from "
                                 f"{'their' if len(unseen) > 1 else 'its'} own words, and probabilities use no "
                                 "fitted temperature")

    def _autocast(self):  # type: ignore[no-untyped-def]
        return autocast(self.device, self.precision)

    @property
    def detector(self) -> FaceDetector:
        """The default face detector (MTCNN)."""
        return self.detector_for("mtcnn")

    def detector_for(self, method: str) -> FaceDetector:
        return self._shared.get(method, lambda: FaceDetector(str(self.device), min_face=self._detector_args[1],
                                                             threshold=self._detector_args[0], method=method))

    def find_faces(self, image: Image.Image, detect: str = "mtcnn") -> list[tuple[DetectedFace, Image.Image]]:
        """Detected faces with their model-ready crops (empty when no face is found)."""
        return self.find_faces_many([image], detect)[0]

    def find_faces_many(self, images: Sequence[Image.Image], detect: str = "mtcnn", on_error: str = "raise"
                        ) -> list[Any]:
        """:meth:`find_faces` for several images, the detector running over those of one size together (a
        video's frames); with ``on_error="return"`` an image's :class:`CepromptError` in its place."""
        if detect not in DETECT_MODES:
            raise ConfigError(f"detect={detect!r}; expected one of {DETECT_MODES}")
        if detect == "none":
            return [[(whole_image_face(image), self._resize(image))] for image in images]
        detector = self.detector_for(detect)
        self._follow_load()
        try:
            found: list[Any] = detector.detect_many(images)
        except CepromptError:
            if len(images) == 1 and on_error == "raise":
                raise
            # one image failed the detector: find which, and keep the others
            found = _each(images, detector.detect, on_error)
        size = self.preprocess.image_size
        return [faces if isinstance(faces, CepromptError) else
                [(f, align_face(image, f.box, f.landmarks, size, self.expand)) for f in faces]
                for image, faces in zip(images, found)]

    def _follow_load(self) -> None:
        if self._threads is not None:
            self._threads.follow()

    @torch.no_grad()
    def _forward(self, crops: Sequence[Image.Image]) -> ScoreOutput:
        self._follow_load()
        batch = self.preprocess.batch_tensor(crops).to(self.device)
        with self._autocast():
            return self.model(batch, text_features=self.text_features)

    def _score(self, crops: Sequence[Image.Image]) -> tuple[np.ndarray, torch.Tensor]:
        out = self._forward(crops)
        return out.logits.float().cpu().numpy(), out.patches.float().cpu()

    def embed(self, images: ImageInput | Iterable[ImageInput], detect: str = "mtcnn", batch_size: int = 32
              ) -> list[FaceEmbedding]:
        """Per face, the model's image embedding (the projected class token the global score uses), scaled to unit
        length: the features of the paper's t-SNE figures. ``images``: one image (a path, PIL image or array) or
        several; faces of every image, in order, largest first."""
        images = [images] if _is_one_image(images) else list(images)
        results, embeddings = self._predict(images, detect, batch_size)
        return [FaceEmbedding(index, face.box, vector, face.label)
                for index, (faces, vectors) in enumerate(zip(results, embeddings))
                for face, vector in zip(faces, vectors)]

    def _results(self, faces: Sequence[DetectedFace], scores: np.ndarray) -> list[FaceResult]:
        logits = scores * self.temperature
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        results = []
        for face, p in zip(faces, probs):
            best = int(p.argmax())
            results.append(FaceResult(
                box=tuple(round(v, 2) for v in face.box), landmarks=face.landmarks,
                detector_confidence=face.confidence, label=self.class_names[best], score=float(p[best]),
                probabilities={c: float(v) for c, v in zip(self.class_names, p)},
            ))
        return results

    def predict(self, image: ImageInput, detect: str = "mtcnn") -> list[FaceResult]:
        """One record per face found in ``image``, largest face first; [] when there is none."""
        return self.predict_batch([image], detect=detect)[0]

    def predict_batch(self, images: Iterable[ImageInput], detect: str = "mtcnn", batch_size: int = 32,
                      on_error: str = "raise") -> list[Any]:
        """:meth:`predict` for many images, with the face crops classified in batches.

        ``on_error="return"`` puts the :class:`~ceprompt.core.errors.CepromptError` of an image that cannot be
        read or searched in that image's place instead of raising, so one bad file loses nothing else.
        """
        return self._predict(images, detect, batch_size, on_error)[0]

    def _predict(self, images: Iterable[ImageInput], detect: str, batch_size: int, on_error: str = "raise"
                 ) -> tuple[list[Any], list[list[np.ndarray]]]:
        """Per image: its faces' results (or its error) and their image embeddings (unit length)."""
        if on_error not in ("raise", "return"):
            raise ConfigError(f"on_error={on_error!r}; expected 'raise' or 'return'")
        loaded = _each(images, self.load_image, on_error)
        readable = [image for image in loaded if not isinstance(image, CepromptError)]
        faces = iter(self.find_faces_many(readable, detect, on_error))
        found = [image if isinstance(image, CepromptError) else next(faces) for image in loaded]
        return self.classify(found, batch_size, on_error)

    def classify(self, found: Sequence[Any], batch_size: int = 32, on_error: str = "raise"
                 ) -> tuple[list[Any], list[list[np.ndarray]]]:
        """The faces :meth:`find_faces` gave for several images (or an image's error in its place), classified in
        batches across the images: per image its results (or its error) and their unit-length embeddings."""
        check("batch_size", batch_size, POSITIVE_INT)
        flat = [(i, face, crop) for i, faces in enumerate(found) if isinstance(faces, list) for face, crop in faces]
        results: list[Any] = [faces if isinstance(faces, CepromptError) else [] for faces in found]
        embeddings: list[list[np.ndarray]] = [[] for _ in found]
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            out = self._forward([crop for _, _, crop in chunk])
            scores = out.logits.float().cpu().numpy()
            vectors = torch.nn.functional.normalize(out.global_emb.float(), dim=-1).cpu().numpy()
            for (i, face, _), row, vector in zip(chunk, scores, vectors):
                if isinstance(results[i], CepromptError):
                    continue
                if not np.isfinite(row).all():  # extreme weights or normalisation: never a result that looks valid
                    results[i] = CepromptError(NOT_FINITE)
                    if on_error == "raise":
                        raise results[i]
                    continue
                results[i].append(self._results([face], row[None])[0])
                embeddings[i].append(vector)
        return results, embeddings

    def explain(self, image: ImageInput, detect: str = "mtcnn", batch_size: int = 32) -> list[Explanation]:
        """Per face: how much each patch resembles the predicted class (the local score's evidence)."""
        return self.explain_faces(self.find_faces(self.load_image(image), detect), batch_size)

    def explain_faces(self, faces: Sequence[tuple[DetectedFace, Image.Image]], batch_size: int = 32
                      ) -> list[Explanation]:
        """:meth:`explain` for faces already found (:meth:`find_faces`), scored ``batch_size`` at a time."""
        check("batch_size", batch_size, POSITIVE_INT)
        out = []
        for start in range(0, len(faces), batch_size):
            chunk = faces[start:start + batch_size]
            crops = [crop for _, crop in chunk]
            scores, patches = self._score(crops)
            if not np.isfinite(scores).all():
                raise CepromptError(NOT_FINITE)
            sim = patch_class_similarity(patches, self.text_features.cpu())  # (faces, N, C)
            grid = int(round(sim.shape[1] ** 0.5))
            k = min(self.model.head.top_k, sim.shape[1])
            for j, (result, crop) in enumerate(zip(self._results([f for f, _ in chunk], scores), crops)):
                s = sim[j, :, self.class_names.index(result.label)]
                heat = ((s - s.min()) / (s.max() - s.min() + 1e-8)).reshape(grid, grid).numpy()
                out.append(Explanation(result, crop, heat, s.topk(k).indices.tolist()))
        return out

    # -- video ---------------------------------------------------------------------------------------------------

    def tracker(self, smooth: float = DEFAULT_SMOOTH, memory: float = DEFAULT_MEMORY, detect: str = "mtcnn"
                ) -> "FaceTracker":
        """A tracker for frames you decode yourself (a webcam loop, another pipeline): give it each frame with its
        time; it returns the frame's faces with track ids and smoothed expressions (:class:`FaceTracker`)."""
        return FaceTracker(self, smooth, memory, detect)

    def predict_video(self, video: str | os.PathLike, stride: int | None = None, fps: float | None = None,
                      smooth: float = DEFAULT_SMOOTH, memory: float = DEFAULT_MEMORY, detect: str = "mtcnn",
                      batch_size: int = 32) -> Iterator[FrameRecord]:
        """The sampled frames of a video, in order, each with its time and its faces: track id, this frame's
        result and the result smoothed along the track. ``stride``: every N-th frame (default 1); ``fps``: that
        many frames per second instead. Memory stays constant however long the video is."""
        for _, record in self.video_frames(video, stride, fps, smooth, memory, detect, batch_size):
            if record is not None:
                yield record

    def video_frames(self, video: str | os.PathLike, stride: int | None = None, fps: float | None = None,
                     smooth: float = DEFAULT_SMOOTH, memory: float = DEFAULT_MEMORY, detect: str = "mtcnn",
                     batch_size: int = 32, every_frame: bool = False, frames_per_batch: int = 8
                     ) -> Iterator[tuple[Frame, FrameRecord | None]]:
        """Every decoded frame (its image only when sampled, or with ``every_frame``) with the record of the sampled
        ones. Sampled frames are detected and classified ``frames_per_batch`` at a time (their faces in one forward
        pass); decoding runs ahead in its own thread. A decoding failure (:class:`VideoError`) is raised after the
        frames before it."""
        tracks = FaceTracks(self.class_names, smooth, memory)
        with VideoReader(video, stride, fps, every_frame) as reader:
            pending: list[Frame] = []
            try:
                for frame in reader:
                    pending.append(frame)
                    held = sum(f.image.width * f.image.height for f in pending if f.image is not None)
                    if sum(f.sampled for f in pending) >= frames_per_batch or held > FRAMES_HELD_PIXELS:
                        yield from self._tracked(pending, tracks, detect, batch_size)
                        pending = []
            except VideoError:
                yield from self._tracked(pending, tracks, detect, batch_size)
                raise
            yield from self._tracked(pending, tracks, detect, batch_size)

    def _tracked(self, frames: list[Frame], tracks: FaceTracks, detect: str, batch_size: int
                 ) -> Iterator[tuple[Frame, FrameRecord | None]]:
        sampled = [f for f in frames if f.sampled]
        results, embeddings = self._predict([f.image for f in sampled], detect, batch_size)
        found = iter(zip(results, embeddings))
        for frame in frames:
            record = None
            if frame.sampled:
                faces, vectors = next(found)
                record = FrameRecord(frame.time, tracks.update(frame.time, faces, vectors), frame.index)
            yield frame, record

    @staticmethod
    def load_image(image: ImageInput) -> Image.Image:
        """Upright 8-bit RGB (:func:`ceprompt.data.images.open_image` for paths)."""
        if isinstance(image, (str, os.PathLike)):
            return open_image(image)
        return to_pil(image)


def _each(items: Iterable[Any], fn: Callable[[Any], Any], on_error: str) -> list[Any]:
    """``fn`` of each item; with ``on_error="return"`` an item's :class:`CepromptError` in its place."""
    out: list[Any] = []
    for item in items:
        try:
            out.append(fn(item))
        except CepromptError as exc:
            if on_error == "raise":
                raise
            out.append(exc)
    return out


def _is_one_image(value: Any) -> bool:
    """A path, a PIL image or an array is one image; any other iterable holds several."""
    return isinstance(value, (str, os.PathLike, Image.Image, np.ndarray))


def load(checkpoint: str | os.PathLike, device: str = "auto", precision: str = "auto", **kwargs: Any) -> Recognizer:
    """A :class:`Recognizer` for a checkpoint file, a run directory (its best checkpoint), an imported or
    exported folder, or a model on the Hugging Face Hub (``hf-hub:ORG/NAME[@REV]``).

    A model that carries a notice (the demo's: drawn faces only) says so with a warning.
    """
    rec = Recognizer(load_trained(checkpoint), device=device, precision=precision, **kwargs)
    if rec.notice:
        warnings.warn(rec.notice, UserWarning, stacklevel=_callers_level())
    return rec


def _callers_level() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside the ceprompt package (the user's
    line, not ``ceprompt/__init__.py``'s ``load``)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the function that warns
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path  # the run directory (config.yaml, summary.csv, checkpoints/, eval/)
    stage: str  # eva or cat
    checkpoint: Path  # checkpoints/best.safetensors
    metrics: dict[str, Any] | None  # eval/metrics.json of the chosen epoch (None with run.final_eval=false)


def train(config: str | os.PathLike | None = None, resume: str | os.PathLike | None = None, overwrite: bool = False,
          sets: Sequence[str] | str = (), **overrides: Any) -> RunResult:
    """Train either stage from Python, exactly as ``ceprompt train`` does (the same code).

    ``config``: a YAML file or a shipped name (``"rafdb_stage1"``); ``resume``: a run directory to continue.
    Overrides are keyword arguments with ``__`` for the dot, ``ceprompt.train("rafdb_stage1",
    data__root="data/RAF-DB", optim__epochs=10)``: Python values (numpy numbers and paths too), checked as a
    config file's are and never parsed from text; or ``sets=["optim.epochs=10"]``, text as on the command line.
    """
    from .engine.train import train as run
    from .engine.train import training_config

    values = {key.replace("__", "."): value for key, value in overrides.items()}
    cfg = training_config(config, resume, [sets] if isinstance(sets, str) else list(sets), values)
    run_dir = Path(run(cfg, resume=resume, overwrite=overwrite))
    metrics_file = run_dir / "eval" / "metrics.json"
    metrics = read_json(metrics_file.read_bytes(), str(metrics_file)) if metrics_file.is_file() else None
    return RunResult(run_dir, cfg.stage, run_dir / "checkpoints" / "best.safetensors", metrics)


# Decoded frames a video pass holds while it batches (annotated videos keep the frames between sampled ones): about
# 200 MB of RGB, a few 4K frames or a batch of 1080p ones.
FRAMES_HELD_PIXELS = 64_000_000


class FaceTracker:
    """Faces followed over frames you give it, with their times: the recognizer's detection and classification,
    ceprompt's tracking and smoothing (:mod:`ceprompt.video.tracking`). Times must not go back."""

    def __init__(self, rec: Recognizer, smooth: float = DEFAULT_SMOOTH, memory: float = DEFAULT_MEMORY,
                 detect: str = "mtcnn") -> None:
        self.rec, self.detect = rec, detect
        self.tracks = FaceTracks(rec.class_names, smooth, memory)

    def update(self, image: ImageInput, time: float) -> FrameRecord:
        """The faces of one frame at ``time`` seconds (a path, PIL image or RGB array)."""
        return self.update_many([image], [time])[0]

    def update_many(self, images: Sequence[ImageInput], times: Sequence[float]) -> list[FrameRecord]:
        """Several frames at once (their faces classified in one forward pass), in time order."""
        if len(images) != len(times):
            raise ConfigError(f"{len(images)} frames but {len(times)} times")
        results, embeddings = self.rec._predict(images, self.detect, 32)
        return [FrameRecord(float(t), self.tracks.update(float(t), faces, vectors))
                for t, faces, vectors in zip(times, results, embeddings)]


class _SharedDetector:
    """The face detectors of a recognizer and the recognizers made from it, each created once, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._detectors: dict[str, FaceDetector] = {}

    def get(self, method: str, make: Any) -> FaceDetector:
        with self._lock:
            if method not in self._detectors:
                self._detectors[method] = make()
            return self._detectors[method]
