"""Reading a video (PyAV): every frame with its time in seconds, upright, its size checked as it is decoded.

* **Time** comes from each frame's timestamp (``pts x time_base``, counted from the first frame), so it is right
  for variable frame rates; a stream without timestamps falls back to frame index / average rate.
* **Sampling**: every ``stride``-th frame, or ``fps`` samples per second whatever the source rate (the first frame
  at or after each multiple of 1/fps). Frames that are not sampled are decoded (the codec needs them) and, unless
  asked for (annotated videos), never converted to images.
* **Upright**: the display matrix of phone videos (portrait recordings are stored sideways) is applied.
* **Bounded**: every decoded frame is checked against the pixel limit (a stream may switch resolution mid-way), not
  only the header; decoding runs in its own thread, a few frames ahead, so memory is constant however long the
  video is.
* **Contained**: anything the decoder raises is this file's error (:class:`VideoError`), raised after the frames
  decoded before it, never the run's.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..core.errors import CepromptError, ConfigError
from ..core.ranges import POSITIVE_INT, Range, check
from ..data.images import max_pixels

FPS = Range(0, 1000, lo_open=True)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180,
              -90: Image.Transpose.ROTATE_270, 270: Image.Transpose.ROTATE_270}
_DONE = object()


class VideoError(CepromptError):
    """A video cannot be read (further); the frames before the failure were delivered."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares, against which decoding is checked (time without timestamps, completeness)."""

    rate: Fraction  # average frame rate (a guess for variable-rate streams)
    frames: int  # the container's frame count, 0 when unknown
    duration: float | None  # seconds, when the container says


@dataclass
class Frame:
    index: int  # position in the stream (0 = first decoded frame)
    time: float  # seconds from the first frame
    image: Image.Image | None  # upright RGB; None for a frame neither sampled nor wanted
    sampled: bool
    rate: Fraction = Fraction(25)  # the stream's average frame rate


def check_sampling(stride: int | None, fps: float | None) -> tuple[int | None, float | None]:
    if stride is not None and fps is not None:
        raise ConfigError("--video-stride and --fps both choose which frames are classified; give one")
    if fps is not None:
        return None, float(check("--fps", fps, FPS))
    return int(check("--video-stride", 1 if stride is None else stride, POSITIVE_INT)), None


class _Sampler:
    def __init__(self, stride: int | None, fps: float | None) -> None:
        self.stride, self.fps = check_sampling(stride, fps)
        self.next_k = 0

    def __call__(self, index: int, time: float) -> bool:
        if self.fps is None:
            return index % self.stride == 0
        # the first frame at or after each multiple of 1/fps (a millisecond's slack for rounded timestamps)
        if time * self.fps + 1e-3 * self.fps < self.next_k:
            return False
        self.next_k = math.floor(time * self.fps + 1e-3 * self.fps) + 1
        return True


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise CepromptError("reading videos needs PyAV: pip install 'ceprompt[video]'") from None
    return av


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


class VideoReader:
    """Frames of one video, decoded in a background thread; a context manager (closing it stops the thread)."""

    def __init__(self, path: str | os.PathLike, stride: int | None = None, fps: float | None = None,
                 every_frame: bool = False, ahead: int = 8) -> None:
        self.path = Path(path)
        self.sampled = _Sampler(stride, fps)
        self.every_frame = every_frame
        self.limit = max_pixels()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        av = _av()
        if not self.path.is_file():
            raise VideoError("no such file" if not self.path.exists() else "not a regular file")
        try:
            self.container = av.open(str(self.path))
        except Exception as exc:  # PyAV raises its own types (and OSError) for what it cannot open
            raise VideoError(f"cannot decode video ({_reason(exc)})") from None
        try:
            self.info = self._info()
        except Exception:
            self.container.close()
            raise

    def _info(self) -> VideoInfo:
        if not self.container.streams.video:
            raise VideoError("no video stream (an audio-only file?)")
        stream = self.container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width or 0, ctx.height or 0
        if width * height > self.limit:  # the header's size, before any frame; every frame is checked again
            raise VideoError(f"{width}x{height} frames are {width * height:,} pixels, over the limit of "
                             f"{self.limit:,} (raise it with --max-pixels or $CEPROMPT_MAX_PIXELS)")
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and self.container.duration:  # Matroska declares the whole file's
            duration = self.container.duration / 1_000_000
        return VideoInfo(Fraction(rate), int(stream.frames or 0), duration)

    # -- the decoding thread ----------------------------------------------------------------------------------

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self) -> None:
        index, start = 0, None
        try:
            stream = self.container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg's own frame threads for codecs that have them
            rate = float(self.info.rate) or 25.0
            for frame in self.container.decode(stream):
                if self._stop.is_set():
                    return
                if frame.width * frame.height > self.limit:
                    raise VideoError(f"frame {index} is {frame.width}x{frame.height} = {frame.width * frame.height:,} "
                                     f"pixels, over the limit of {self.limit:,} (the stream changed size)")
                stamp = frame.time
                if stamp is not None and start is None:
                    start = stamp
                time = stamp - start if stamp is not None and start is not None else index / rate
                sampled = self.sampled(index, time)
                image = None
                if sampled or self.every_frame:
                    image = frame.to_image()
                    turn = _TRANSPOSE.get(int(round(frame.rotation or 0)))
                    if turn is not None:
                        image = image.transpose(turn)
                if not self._put(Frame(index, time, image, sampled, self.info.rate)):
                    return
                index += 1
            self._check_complete(index, time if index else None)
        except VideoError as exc:
            self._put(exc)
        except MemoryError:
            self._put(VideoError(f"out of memory while decoding frame {index}"))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's error, after its frames
            where = f"frame {index}" if index else "its first frame"
            self._put(VideoError(f"cannot decode video at {where} ({_reason(exc)})"))
        finally:
            self._put(_DONE)

    def _check_complete(self, decoded: int, last: float | None) -> None:
        """FFmpeg stops quietly at data it cannot read (a file cut short, a corrupt half): compare what was decoded
        with what the file declares, so that a video read in part is never taken for a whole one."""
        declared, duration = self.info.frames, self.info.duration
        if decoded == 0:
            raise VideoError("no frame could be decoded (an empty or corrupt stream)")
        if declared and decoded < declared - max(2, 0.02 * declared):
            raise VideoError(f"the stream ended after {decoded} of its {declared} frames (cut short or corrupt); the "
                             "rows above are the frames read")
        rate = float(self.info.rate) or 25.0
        if not declared and duration and last is not None and last + max(0.5, 0.1 * duration) + 2 / rate < duration:
            raise VideoError(f"the stream ended at {last:.2f} s of its {duration:.2f} s (cut short or corrupt); the "
                             "rows above are the frames read")

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._decode, name=f"decode {self.path.name}", daemon=True)
            self._thread.start()
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
