"""MTCNN's cascade over a batch of images, with each stage's candidates resampled in one call.

facenet-pytorch's ``detect_face`` (the library's code, version 2.5.3) cuts every candidate box of the second and
third stage out of the image and resamples it to 24 or 48 pixels with its own ``interpolate`` call: hundreds of
small operations per photo, each of which wakes torch's thread pool (on a busy AMX machine 2.8 s of an 11 s
photo went there). This module runs the same cascade with the library's own networks and box helpers
(``generateBoundingBox``, ``batched_nms``, ``bbreg``, ``rerec``, ``pad``, ``batched_nms_numpy``); only the cutting
and resampling of the candidates is ceprompt's: one box-filter resampling of all of a stage's candidates from the
images' integral image, the same averaging windows as ``interpolate(mode="area")`` (to float rounding; the
integral image is summed in float64). Its output is checked against ``detect_face`` on real photos in the tests.
A degenerate box (no pixel inside the image) is given an empty crop instead of being dropped, which in the
library shifts every later box's network output by one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.nn.functional import pad as tensor_pad


def resample_boxes(images: torch.Tensor, index: torch.Tensor, y: np.ndarray, ey: np.ndarray, x: np.ndarray,
                   ex: np.ndarray, size: int) -> torch.Tensor:
    """The boxes (1-based, inclusive, as facenet's ``pad`` gives them) of ``images`` (B, C, H, W), box k from image
    ``index[k]``, each resampled to ``size`` x ``size`` by area averaging: (K, C, size, size)."""
    device = images.device
    integral = tensor_pad(images.double().cumsum(2).cumsum(3), (1, 0, 1, 0))  # (B, C, H + 1, W + 1)
    steps = torch.arange(size, device=device)

    def windows(start: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        origin = torch.as_tensor(start - 1, device=device).long()[:, None]
        length = torch.as_tensor(end - start + 1, device=device).long().clamp(min=0)[:, None]
        return origin + steps * length // size, origin + -((-(steps + 1) * length) // size)

    r0, r1 = windows(y, ey)
    c0, c1 = windows(x, ex)
    b = index.to(device).long()[:, None, None]

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (K, size, size, C)
        return integral[b, :, rows[:, :, None], cols[:, None, :]]

    total = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    area = ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :]).unsqueeze(-1)
    out = torch.where(area > 0, total / area.clamp(min=1), torch.zeros((), dtype=total.dtype, device=device))
    return out.permute(0, 3, 1, 2).to(images.dtype)


def detect(images: Sequence[Any], minsize: float, pnet: Any, rnet: Any, onet: Any, threshold: Sequence[float],
           factor: float, device: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in equally sized images (PIL or H x W x 3 uint8): per image (boxes (n, 5): x0, y0, x1, y1, score;
    points (n, 5, 2)), as facenet-pytorch's ``detect_face`` returns them."""
    from facenet_pytorch.models.utils.detect_face import (
        batched_nms,
        batched_nms_numpy,
        bbreg,
        fixed_batch_process,
        generateBoundingBox,
        imresample,
        pad,
        rerec,
    )

    arrays = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    imgs = torch.as_tensor(arrays, device=device).permute(0, 3, 1, 2).type(next(pnet.parameters()).dtype)
    batch = len(imgs)
    h, w = imgs.shape[2:4]
    m = 12.0 / minsize
    minl = min(h, w) * m
    scales, scale = [], m
    while minl >= 12:
        scales.append(scale)
        scale, minl = scale * factor, minl * factor

    # first stage: P-Net over the pyramid, all images at once per scale (the library's own way)
    boxes, image_inds, picks, offset = [], [], [], 0
    for scale in scales:
        data = (imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(data)
        found, found_inds = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
        boxes.append(found)
        image_inds.append(found_inds)
        picks.append(batched_nms(found[:, :4], found[:, 4], found_inds, 0.5) + offset)
        offset += found.shape[0]
    boxes, image_inds = torch.cat(boxes, dim=0), torch.cat(image_inds, dim=0)
    pick = torch.cat(picks, dim=0)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]]).permute(1, 0)
    boxes = rerec(boxes)

    # second stage: R-Net on every candidate, cut and resampled in one call
    if len(boxes) > 0:
        y, ey, x, ex = pad(boxes, w, h)
        data = (resample_boxes(imgs, image_inds, y, ey, x, ex, 24) - 127.5) * 0.0078125
        out = fixed_batch_process(data, rnet)  # the library's chunks of 512 bound the memory
        out0, score = out[0].permute(1, 0), out[1].permute(1, 0)[1, :]
        keep = score > threshold[1]
        boxes = torch.cat((boxes[keep, :4], score[keep].unsqueeze(1)), dim=1)
        image_inds, moves = image_inds[keep], out0[:, keep].permute(1, 0)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, moves = boxes[pick], image_inds[pick], moves[pick]
        boxes = rerec(bbreg(boxes, moves))

    # third stage: O-Net, boxes and landmarks
    points = torch.zeros(0, 5, 2, device=device)
    if len(boxes) > 0:
        y, ey, x, ex = pad(boxes, w, h)
        data = (resample_boxes(imgs, image_inds, y, ey, x, ex, 48) - 127.5) * 0.0078125
        out = fixed_batch_process(data, onet)
        out0, out1, score = out[0].permute(1, 0), out[1].permute(1, 0), out[2].permute(1, 0)[1, :]
        keep = score > threshold[2]
        points = out1[:, keep]
        boxes = torch.cat((boxes[keep, :4], score[keep].unsqueeze(1)), dim=1)
        image_inds, moves = image_inds[keep], out0[:, keep].permute(1, 0)
        w_i, h_i = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
        points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
        points = torch.stack((points_x, points_y)).permute(2, 1, 0)
        boxes = bbreg(boxes, moves)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes, points, image_inds = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu().numpy()
    return [(boxes[image_inds == i].copy(), points[image_inds == i].copy()) for i in range(batch)]
