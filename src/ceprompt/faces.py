"""Face detection (MTCNN, from facenet-pytorch) and the one face-crop policy used everywhere.

The same :func:`align_face` cuts the faces for ``ceprompt prepare --align`` (training data, like
RAF-DB's ``aligned_224``) and for ``ceprompt predict`` (inference), so a model never sees crops at
inference that differ from the ones it was trained on. The policy:

1. rotate the image about the midpoint of the eyes so that the eyes are level (when the detector
   gives landmarks);
2. take a square centred on the detector's box (rotated with the image), its side
   ``expand`` x the longer side of the box (default 1.3: the whole face with a little margin);
3. resize it to the model's input size, bicubic; parts outside the image are filled with black.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import CepromptError
from .images import as_rgb

DEFAULT_EXPAND = 1.3
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
    side = max(x1 - x0, y1 - y0) * expand
    angle = 0.0
    if landmarks is not None and len(landmarks) >= 2:
        (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        ex, ey = (lx + rx) / 2, (ly + ry) / 2
        # where the box centre lands after rotating the image by -angle about the eye midpoint
        a = math.radians(angle)
        dx, dy = cx - ex, cy - ey
        cx, cy = ex + dx * math.cos(a) + dy * math.sin(a), ey - dx * math.sin(a) + dy * math.cos(a)
        image = image.rotate(angle, resample=Image.BICUBIC, center=(ex, ey))
    half = side / 2
    crop = image.convert("RGB").crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return crop.resize((size, size), Image.BICUBIC)


def whole_image_face(image: Image.Image) -> DetectedFace:
    """``--detect none``: the image is already a face crop."""
    return DetectedFace(box=(0.0, 0.0, float(image.width), float(image.height)), landmarks=None, confidence=None)


class FaceDetector:
    """MTCNN with its weights bundled in facenet-pytorch (no download)."""

    def __init__(self, device: str = "cpu", min_face_size: int = 20, threshold: float = 0.9) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise CepromptError(
                "face detection needs facenet-pytorch: pip install 'ceprompt[face]' "
                "(or pass --detect none / detect='none' for images that are already face crops)"
            ) from None
        self.threshold, self.min_face_size = threshold, min_face_size
        self.mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, device=device, post_process=False)

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Faces above the confidence threshold, largest first; an empty list when there are none."""
        if min(image.size) < self.min_face_size:  # no face of the minimum size fits (and MTCNN would fail)
            return []
        try:
            boxes, probs, points = self.mtcnn.detect(image.convert("RGB"), landmarks=True)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise CepromptError(f"face detection failed on this {image.width}x{image.height} image "
                                f"({str(exc).splitlines()[0][:120]})") from None
        if boxes is None:
            return []
        faces = [
            DetectedFace(box=tuple(float(v) for v in b), landmarks=[(float(x), float(y)) for x, y in p],
                         confidence=float(c))
            for b, c, p in zip(boxes, probs, points)
            if c is not None and c >= self.threshold
        ]
        return sorted(faces, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def to_pil(image: object) -> Image.Image:
    """A PIL RGB image from a PIL image (EXIF orientation applied) or a numpy array (H x W [x 3|4], uint8 or
    float in [0, 1])."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            return Image.fromarray(arr.squeeze()).convert("RGB")
        raise CepromptError(f"image array of shape {arr.shape}: expected H x W, H x W x 3 or H x W x 4")
    raise CepromptError(f"cannot read an image from a {type(image).__name__}; expected a path, PIL image or array")
