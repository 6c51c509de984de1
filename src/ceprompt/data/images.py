"""The one way ceprompt opens an image, wherever it comes from (datasets, predict, the API, uploads).

* Only formats that Pillow decodes in-process are opened (:data:`FORMATS`): JPEG (also phones' MPO), PNG,
  WebP, BMP, TIFF, GIF, AVIF and HEIC/HEIF (pillow-heif). Everything else, whatever its name, is refused
  before decoding: Pillow's EPS plugin, for one, would run Ghostscript on the file's PostScript.
* Only regular files are opened (a FIFO or device would block or never end).
* The pixel count is read from the header and checked against one limit *before* anything is
  decoded (:func:`max_pixels`; ``--max-pixels``, ``$CEPROMPT_MAX_PIXELS``), so a small file that
  declares a huge image costs nothing.
* EXIF orientation is applied: the image is returned upright, as viewers and browsers show it,
  and face boxes are given in that frame.
* 16-bit and 32-bit images are scaled to 8 bits instead of clipped; every mode ends as RGB.
* Every failure is an :class:`ImageError` naming the file: callers report it per file.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import DataError
from ..core.ranges import POSITIVE_INT, check

# Pillow format names that decode in-process (no external program); HEIF comes from pillow-heif.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF")
# 50 megapixels: every phone and camera photo up to 8660 x 5770; decoding one costs about 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
_ENV = "CEPROMPT_MAX_PIXELS"
# Whatever a decoder raises for bad bytes is that file's error, never the run's (pillow-heif's AVIF raises
# RuntimeError, Pillow's plugins everything from SyntaxError to struct.error)...
_DECODE_ERRORS = (Exception,)
# ...except running short of memory, which says nothing about the file: a server answers it "try again" (503),
# not "not an image" (415). Each `except _DECODE_ERRORS` below follows an `except _NOT_THE_FILE: raise`.
_NOT_THE_FILE = (MemoryError,)


class ImageError(DataError):
    """One image cannot be used; the message starts with its name."""


class _Undecodable(Exception):
    """The bytes are not an image Pillow can read; each caller words it for its own context."""


def max_pixels() -> int:
    """The pixel limit in force: ``$CEPROMPT_MAX_PIXELS`` (set by ``--max-pixels``), else the default."""
    raw = os.environ.get(_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    return check(_ENV, int(raw) if raw.strip().isdigit() else raw, POSITIVE_INT)  # check() names a bad value


def set_max_pixels(limit: int | None) -> None:
    """Change the limit for this process and the processes it starts (data loader workers)."""
    if limit is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = str(check("max_pixels", limit, POSITIVE_INT))


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """:func:`set_max_pixels` for the duration of a block (None: leave the limit as it is)."""
    previous = os.environ.get(_ENV)
    if limit is not None:
        set_max_pixels(limit)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous


@dataclass(frozen=True)
class ImageInfo:
    problem: str | None  # None when the file opens (and, with a full check, decodes)
    mode: str | None = None  # PIL mode before conversion, e.g. RGB, L, I;16, CMYK
    size: tuple[int, int] | None = None  # width, height as stored (before EXIF rotation)


Source = str | os.PathLike | bytes | BinaryIO


def _open(source: Source, name: str) -> Image.Image:
    """Open lazily (header only) after checking the source is a regular file."""
    if isinstance(source, (str, os.PathLike)):
        try:
            st = os.stat(source)
        except FileNotFoundError:
            raise ImageError(f"{name}: missing image file") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{name}: not a regular file (a folder, FIFO or device); expected an image file")
        if st.st_size == 0:
            raise ImageError(f"{name}: empty file")
    elif isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=_formats())
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: declares more pixels than Pillow's own safety limit; "
                         f"ceprompt's limit is {max_pixels():,} (--max-pixels)") from None
    except _NOT_THE_FILE:
        raise
    except _DECODE_ERRORS as exc:
        raise _Undecodable(_reason(exc)) from None
    limit = max_pixels()
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageError(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,} "
                         "(raise it with --max-pixels or $CEPROMPT_MAX_PIXELS)")
    if width < 1 or height < 1:
        image.close()
        raise ImageError(f"{name}: declares an empty image ({width}x{height})")
    return image


@functools.cache
def _formats() -> tuple[str, ...]:
    """:data:`FORMATS` this Pillow has (Pillow 13 reads MPO through its JPEG plugin and registers no MPO)."""
    _register_heif()
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


@functools.cache
def _register_heif() -> None:
    """HEIC/HEIF (what phones write) through pillow-heif, when it is installed."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "BytesIO" in text or "<_io." in text or "cannot identify image file" in text:
        # Pillow names the buffer object or the path, which says nothing about why
        text = f"not an image in an accepted format ({', '.join(FORMATS)})"
    return text[:200]


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; wider integer and float modes are scaled, not clipped. An image without pixels or
    whose pixels are not numbers (all NaN) is refused: it would still give a face and probabilities."""
    mode = image.mode
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image: {image.width}x{image.height} pixels; expected at least 1x1")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).any():
            raise ImageError("image: no pixel has a finite value (all NaN or infinite)")
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
            arr = arr / top * 255.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(source: Source, name: str | None = None, at_least: int | None = None) -> Image.Image:
    """An upright 8-bit RGB image, fully decoded; :class:`ImageError` (naming the file) otherwise.

    ``at_least``: the image will be resized to this many pixels a side, so a JPEG may be decoded at 1/2, 1/4 or
    1/8 of its size where both sides stay at least that large (libjpeg's scaled decoding: the resize that follows
    then has a quarter or less of the pixels to work through). Training and evaluation read datasets this way;
    photos given to ``predict`` are decoded whole (their faces are cut from them at full resolution)."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        image = _open(source, name)
    except _Undecodable as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None
    try:
        with image:
            if at_least and image.format == "JPEG":
                image.draft("RGB", (at_least, at_least))
            image.load()
            return _to_8bit_rgb(_upright(image))
    except _NOT_THE_FILE:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name}: cannot decode image ({_reason(exc)})") from None


def image_size(source: Source, name: str | None = None) -> tuple[int, int]:
    """Width and height as stored, from the header alone (the format allowlist and the pixel limit apply)."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        image = _open(source, name)
    except _Undecodable as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None
    with image:
        return image.size


def as_rgb(image: Image.Image) -> Image.Image:
    """An already opened PIL image made like :func:`open_image`'s: upright, 8-bit RGB."""
    try:
        return _to_8bit_rgb(_upright(image))
    except _NOT_THE_FILE:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageError(f"image: cannot decode ({_reason(exc)})") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied); a malformed EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image) or image
    except _NOT_THE_FILE:
        raise
    except _DECODE_ERRORS:
        return image


def probe_image(path: str | os.PathLike, full: bool = False) -> ImageInfo:
    """Check an image without keeping it: header and pixel limit, and with ``full`` every pixel."""
    name = str(path)
    try:
        image = _open(path, name)
        with image:
            mode, size = image.mode, image.size
            if full:
                image.load()
            else:
                image.verify()
    except ImageError as exc:
        return ImageInfo(str(exc).removeprefix(f"{name}: "))
    except _Undecodable as exc:
        return ImageInfo(f"unreadable image ({exc})")
    except _NOT_THE_FILE:
        raise
    except _DECODE_ERRORS as exc:
        return ImageInfo(f"unreadable image ({_reason(exc)})")
    return ImageInfo(None, mode, size)


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".avif", ".heic",
                            ".heif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
