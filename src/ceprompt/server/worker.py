"""The model's one thread, shared by every request and every live camera: requests that wait together are given to
the face detector together (on a GPU it searches same-size images, such as live frames, in one pass) and classified
together, in one forward pass per class list.

* **One thread**: torch's thread pool belongs to the thread that calls it; a model hopping between threads left
  pools spinning beside each other.
* **Batching**: when a request reaches the model while others are still being received or decoded, the worker
  waits for them at most ``window`` seconds (5 ms by default), up to ``batch_pixels`` decoded pixels in all, then
  classifies every face of them in batches of ``batch_size``: several clients (uploads, live frames) share a
  forward pass. A request alone never waits, and none waits longer than the window.
* **Bounded work per request**: at most ``max_faces`` faces of an image are classified (the largest); the answer says
  how many were left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from PIL import Image

from ..api import Recognizer
from ..core.errors import CepromptError
from ..video.tracking import FaceTracks

DEFAULT_WINDOW = 0.005
DEFAULT_MAX_FACES = 64
DEFAULT_BATCH_PIXELS = 64_000_000


@dataclass
class Job:
    image: Image.Image
    detect: str = "mtcnn"
    explain: bool = False
    classes: tuple[str, ...] | None = None  # None: the model's
    tracks: FaceTracks | None = None  # a live camera's tracks: the frame's faces are followed over time
    time: float = 0.0  # the frame's time (live)
    future: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class Answer:
    recognizer: Recognizer  # the one of the job's classes (its class names, note)
    faces: list[Any]  # FaceResult, or Explanation with explain, or TrackedFace for live frames
    left_out: int = 0  # faces found but not classified (over max_faces)


class ModelWorker:
    def __init__(self, rec: Recognizer, class_aliases: Any = None, window: float = DEFAULT_WINDOW,
                 max_faces: int = DEFAULT_MAX_FACES, batch_size: int = 16,
                 batch_pixels: int = DEFAULT_BATCH_PIXELS) -> None:
        self.rec, self.class_aliases = rec, class_aliases
        self.window, self.max_faces = window, max_faces
        self.batch_size, self.batch_pixels = batch_size, batch_pixels
        self._queue: queue.Queue[Job | _Call | None] = queue.Queue()
        self._arriving = 0  # requests admitted, not yet queued (being read or decoded)
        self._arriving_lock = threading.Lock()
        self._recognizers: dict[tuple[str, ...], Recognizer] = {}
        self.batches: list[int] = []  # requests per batch, the last 1000 (/api/info says how many shared one)
        self._thread = threading.Thread(target=self._loop, name="ceprompt-model", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator["Arrival"]:
        """Around reading and decoding a request: until it is queued (``arrival.run(job)``), the worker may wait (the
        window) for it to join a batch."""
        with self._arriving_lock:
            self._arriving += 1
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.arrived()

    def _arrived(self) -> None:
        with self._arriving_lock:
            self._arriving -= 1

    def run(self, job: Job) -> "asyncio.Future[Answer]":
        """Queue ``job``; an awaitable of its :class:`Answer` (or its error)."""
        self._queue.put(job)
        return asyncio.wrap_future(job.future)

    def call(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Run ``fn`` on the model's thread (anything else that touches the model)."""
        call = _Call(fn)
        self._queue.put(call)
        return asyncio.wrap_future(call.future)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def recognizer_for(self, classes: tuple[str, ...] | None) -> Recognizer:
        """On the model's thread: the recognizer of a class list (its text features computed once, kept for 16)."""
        if classes is None:
            return self.rec
        if classes not in self._recognizers:
            if len(self._recognizers) >= 16:
                self._recognizers.pop(next(iter(self._recognizers)))
            self._recognizers[classes] = self.rec.with_classes(classes, self.class_aliases)
        return self._recognizers[classes]

    # -- the model's thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if isinstance(first, _Call):
                _settle(first.future, first.fn)
                continue
            batch, pixels = [first], first.image.width * first.image.height
            deadline = time.monotonic() + self.window
            while pixels < self.batch_pixels:
                waiting = self._arriving > 0 and time.monotonic() < deadline
                try:  # what is queued already joins; more is waited for only while others are on their way
                    nxt = self._queue.get(timeout=min(0.001, max(0.0, deadline - time.monotonic()))) if waiting \
                        else self._queue.get_nowait()
                except queue.Empty:
                    if waiting:
                        continue
                    break
                if not isinstance(nxt, Job):
                    self._queue.put(nxt)  # handled after this batch
                    break
                batch.append(nxt)
                pixels += nxt.image.width * nxt.image.height
            self._process(batch)

    def _process(self, batch: list[Job]) -> None:
        self.batches = (self.batches + [len(batch)])[-1000:]
        found: dict[int, Any] = {}
        detecting: dict[tuple[int, str], tuple[Recognizer, list[Job]]] = {}
        for job in batch:
            try:
                rec = self.recognizer_for(job.classes)
            except (CepromptError, MemoryError) as exc:
                job.future.set_exception(exc)
                continue
            detecting.setdefault((id(rec), job.detect), (rec, []))[1].append(job)
        for (_, detect), (rec, jobs) in detecting.items():  # the detector runs over same-size images together
            try:
                each = rec.find_faces_many([job.image for job in jobs], detect, on_error="return")
            except (CepromptError, MemoryError) as exc:
                each = [exc] * len(jobs)
            for job, faces in zip(jobs, each):
                if isinstance(faces, BaseException):
                    job.future.set_exception(faces)
                else:
                    found[id(job)] = (rec, faces[: self.max_faces], max(0, len(faces) - self.max_faces))
        live = [job for job in batch if id(job) in found and not job.explain]
        groups: dict[int, list[Job]] = {}
        for job in live:
            groups.setdefault(id(found[id(job)][0]), []).append(job)
        for jobs in groups.values():  # one forward pass (in batches) for all faces of the jobs of one class list
            rec = found[id(jobs[0])][0]
            try:
                results, embeddings = rec.classify([found[id(j)][1] for j in jobs], self.batch_size, on_error="return")
            except (CepromptError, MemoryError) as exc:
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, faces, vectors in zip(jobs, results, embeddings):
                if isinstance(faces, CepromptError):
                    job.future.set_exception(faces)
                    continue
                _, _, left_out = found[id(job)]
                _settle(job.future, lambda: Answer(rec, job.tracks.update(job.time, faces, vectors)
                                                   if job.tracks is not None else faces, left_out))
        for job in batch:
            if id(job) in found and job.explain:
                rec, faces, left_out = found[id(job)]
                _settle(job.future, lambda: Answer(rec, rec.explain_faces(faces, self.batch_size), left_out))


class Arrival:
    """A request on its way to the model (see :meth:`ModelWorker.arriving`)."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker, self.pending = worker, True

    def arrived(self) -> None:
        if self.pending:
            self.pending = False
            self.worker._arrived()

    def run(self, job: Job) -> "asyncio.Future[Answer]":
        future = self.worker.run(job)
        self.arrived()
        return future


def _settle(future: Future, make: Callable[[], Any]) -> None:
    try:
        future.set_result(make())
    except Exception as exc:  # noqa: BLE001 - the worker must outlive any one request (MemoryError included)
        future.set_exception(exc)
