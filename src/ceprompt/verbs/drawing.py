"""Pictures for people: faces boxed and labelled, and explanation heat maps over face crops."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from ..api import Explanation, FaceResult
    from ..video.tracking import TrackedFace

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def annotate(image: Image.Image, faces: Sequence["FaceResult"], class_names: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with a box and "label 0.87" over every face, coloured by class."""
    return _boxed(image, [(f.box, f.label, f"{f.label} {f.score:.2f}") for f in faces], class_names)


def _boxed(image: Image.Image, boxes: Sequence[tuple[Sequence[float], str, str]], class_names: Sequence[str]
           ) -> Image.Image:
    """A copy of ``image`` with each (box, label, text): line width and font scaled to the image, coloured by
    the label's class."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    font = _font(max(12, round(min(out.size) / 30)))
    for box, label, text in boxes:
        _label_box(d, box, text, PALETTE[class_names.index(label) % len(PALETTE)], width, font)
    return out


def _label_box(d: ImageDraw.ImageDraw, box: Sequence[float], text: str, color: tuple[int, int, int], width: int,
               font: ImageFont.ImageFont) -> None:
    x0, y0, x1, y1 = box
    d.rectangle([x0, y0, x1, y1], outline=color, width=width)
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    ty = y0 - (bottom - top) - 2 * width if y0 - (bottom - top) - 2 * width > 0 else y1 + width
    d.rectangle([x0, ty, x0 + right - left + 2 * width, ty + bottom - top + 2 * width], fill=color)
    d.text((x0 + width, ty + width - top), text, fill=(0, 0, 0), font=font)


def explanation_image(expl: "Explanation", scale: int = 4) -> Image.Image:
    """The face crop, the heat map over it, and the top-k patches outlined, side by side."""
    import matplotlib

    crop = expl.crop.convert("RGB")
    size = crop.width * scale
    crop = crop.resize((size, size), Image.BICUBIC)
    grid = expl.heatmap.shape[0]
    heat = Image.fromarray((expl.heatmap * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    colored = (matplotlib.colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    overlay = Image.blend(crop, Image.fromarray(colored), 0.45)
    d = ImageDraw.Draw(overlay)
    cell = size / grid
    for index in expl.top_patches:
        r, c = divmod(index, grid)
        d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 255, 255), width=2)
    canvas = Image.new("RGB", (2 * size + 10, size + 30), (255, 255, 255))
    canvas.paste(crop, (0, 30))
    canvas.paste(overlay, (size + 10, 30))
    ImageDraw.Draw(canvas).text((4, 6), f"{expl.face.label} {expl.face.score:.2f}: patches most like "
                                f"'{expl.face.label}' (top-{len(expl.top_patches)} outlined)",
                                fill=(0, 0, 0), font=_font(14))
    return canvas


def annotate_tracked(image: Image.Image, faces: Sequence["TrackedFace"], class_names: Sequence[str]) -> Image.Image:
    """A copy of a video frame with a box and "#track label 0.87" (the smoothed result) over every face."""
    return _boxed(image, [(f.face.box, f.smoothed_label, f"#{f.track} {f.smoothed_label} {f.smoothed_score:.2f}")
                          for f in faces], class_names)


def save_png(image: Image.Image, path: Path) -> Path:
    """``image`` as a PNG at ``path``, written beside and renamed (a link at ``path`` is replaced, not followed)."""
    from ..core.io_utils import atomic_write

    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path
