"""Writing annotated videos: the source's container type, its frames' own times, upright.

H.264 (libx264, in PyAV's FFmpeg) in MP4, MOV, M4V and Matroska, VP9 in WebM: each frame keeps its source time
(a 1/90000 s time base, the MPEG one), so variable frame rates and rates with large numerators (phones write
519168/19667 fps) are kept exactly. AVI has no timestamps per frame: MPEG-4 part 2 at the average rate, written as
a fraction whose numerator the encoder accepts (at most 65535). Frames are written upright; no rotation metadata is
needed.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.errors import CepromptError

# suffix -> (container format, encoder)
FORMATS = {".mp4": ("mp4", "libx264"), ".m4v": ("mp4", "libx264"), ".mov": ("mov", "libx264"),
           ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".avi": ("avi", "mpeg4")}
TIME_BASE = Fraction(1, 90000)
MAX_TIME_BASE = 65535  # MPEG-4 part 2 refuses a time base denominator above 16 bits


def encoder_rate(rate: Fraction) -> Fraction:
    """The closest frame rate whose numerator (the encoder's time base denominator) fits in 16 bits."""
    rate = Fraction(rate) if rate and rate > 0 else Fraction(25)
    best = Fraction(max(1, round(rate)))
    for denominator in range(1, 1002):
        numerator = round(rate * denominator)
        if 0 < numerator <= MAX_TIME_BASE:
            candidate = Fraction(numerator, denominator)
            if abs(candidate - rate) < abs(best - rate):
                best = candidate
    return best


class AnnotatedVideo:
    """Frames appended with their times; ``path`` may be a temporary name (the format comes from ``suffix``)."""

    def __init__(self, path: Path, suffix: str, rate: Fraction) -> None:
        import av

        if suffix.lower() not in FORMATS:
            raise CepromptError(f"cannot write a {suffix} video; expected one of {', '.join(sorted(FORMATS))}")
        self.format, self.codec = FORMATS[suffix.lower()]
        self.rate = rate
        self.container = av.open(str(path), mode="w", format=self.format)
        self.stream: Any = None
        self.count, self.last_pts = 0, -1

    def _open(self, image: Image.Image) -> None:
        timed = self.codec != "mpeg4"
        rate = Fraction(self.rate).limit_denominator(1001) if timed else encoder_rate(self.rate)
        self.stream = self.container.add_stream(self.codec, rate=rate)
        self.stream.width, self.stream.height = image.width - image.width % 2, image.height - image.height % 2
        self.stream.pix_fmt = "yuv420p"
        if timed:
            self.stream.codec_context.time_base = TIME_BASE
        if self.codec == "libx264":
            self.stream.options = {"crf": "20", "preset": "veryfast"}

    def write(self, image: Image.Image, time: float) -> None:
        import av

        if self.stream is None:
            self._open(image)
        if image.size != (self.stream.width, self.stream.height):
            image = image.crop((0, 0, self.stream.width, self.stream.height))
        frame = av.VideoFrame.from_image(image)
        if self.codec == "mpeg4":
            frame.pts = self.count
        else:  # strictly increasing, also when two source times round to one tick
            frame.pts, frame.time_base = max(round(time / TIME_BASE), self.last_pts + 1), TIME_BASE
            self.last_pts = frame.pts
        self.count += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        try:
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
