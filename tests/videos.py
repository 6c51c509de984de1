"""Test videos made of a real face photo that a package ships (scikit-image's astronaut), placed, moved and hidden:
what a face detector sees in real use, unlike drawn faces."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

Position = tuple[float, float]  # top-left corner of the head in the frame


def head(width: int = 104) -> Image.Image:
    """The astronaut's head with some margin (the face MTCNN finds is at 180..268 x 61..174 in the photo)."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).crop((140, 20, 310, 230))
    return photo.resize((width, round(width * photo.height / photo.width)), Image.BICUBIC)


def background(size: tuple[int, int]) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([90 + 60 * x / w, 110 + 40 * y / h, 140 + 0 * x], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def frame(size: tuple[int, int], heads: Sequence[Position | None], occluders: Sequence[tuple[int, int, int, int]] = (),
          face: Image.Image | None = None) -> Image.Image:
    """A frame with the head at each position (None: not in this frame) and grey boxes drawn over them."""
    image = background(size)
    face = face or head()
    for position in heads:
        if position is not None:
            image.paste(face, (round(position[0]), round(position[1])))
    draw = ImageDraw.Draw(image)
    for box in occluders:
        draw.rectangle(box, fill=(128, 128, 128))
    return image


def write_video(path: Path, frames: Sequence[Image.Image], times: Sequence[float] | None = None, rate: float = 10,
                codec: str = "libx264", rotation: int = 0, time_base: Fraction = Fraction(1, 1000)) -> Path:
    """Encode ``frames`` (with their own ``times`` in seconds, else at ``rate``); ``rotation``: a display matrix
    that turns the stored frames that many degrees counter-clockwise for display."""
    import av

    times = list(times) if times is not None else [i / rate for i in range(len(frames))]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(rate).limit_denominator(1001))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        if codec != "mpeg4":
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for i, (image, t) in enumerate(zip(frames, times)):
            out = av.VideoFrame.from_image(image)
            if codec == "mpeg4":
                out.pts = i
            else:
                out.pts, out.time_base = round(t / time_base), time_base
            for packet in stream.encode(out):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving(start: Position, end: Position, n: int) -> list[Position]:
    return [(start[0] + (end[0] - start[0]) * i / max(n - 1, 1), start[1] + (end[1] - start[1]) * i / max(n - 1, 1))
            for i in range(n)]


def scene(n: int, size: tuple[int, int], paths: Sequence[Callable[[int], Position | None]],
          occluders: Callable[[int], Sequence[tuple[int, int, int, int]]] = lambda i: ()) -> list[Image.Image]:
    face = head()
    return [frame(size, [p(i) for p in paths], occluders(i), face) for i in range(n)]


def write_y4m(path: Path, frames: Sequence[Image.Image], rate: int = 10) -> Path:
    """Raw YUV 4:2:0 frames (Y4M), what Chromium's fake camera plays in a loop."""
    width, height = frames[0].size
    with open(path, "wb") as fh:
        fh.write(f"YUV4MPEG2 W{width} H{height} F{rate}:1 Ip A1:1 C420jpeg\n".encode())
        for image in frames:
            y, cb, cr = image.convert("YCbCr").split()
            fh.write(b"FRAME\n" + y.tobytes())
            for plane in (cb, cr):
                fh.write(plane.resize((width // 2, height // 2), Image.BILINEAR).tobytes())
    return path


def swinging(centre: Position, amplitude: float, n: int, phase: float = 0.0) -> list[Position]:
    """Back and forth along x, ending where it started (a clip that loops without a jump)."""
    import math

    return [(centre[0] + amplitude * math.sin(2 * math.pi * i / n + phase), centre[1]) for i in range(n)]
