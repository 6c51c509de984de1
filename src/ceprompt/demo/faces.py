"""Procedural face-expression images, and captions that describe them without naming the emotion.

A face is an ellipse with eyes, brows, nose and mouth drawn in PIL. The expression lives only in
the geometry - brow height and slant, eye opening, mouth curve, opening and width, nose wrinkles,
a raised lip - sampled around a prototype per class (Ekman's action units, loosely) with enough
noise that neighbouring classes overlap. Everything else varies freely: skin tone, face size,
position and rotation, hair, glasses, background, occluding blocks, noise and blur.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data.datasets import RAFDB_CLASSES


@dataclass
class Expression:
    brow_raise: float  # -1 lowered .. 1 raised
    brow_slant: float  # -1 inner ends down (a V) .. 1 inner ends up
    eye_open: float  # 0.3 narrowed .. 1.5 wide open
    mouth_curve: float  # -1 corners down .. 1 corners up
    mouth_open: float  # 0 closed .. 1 wide open
    mouth_width: float  # 0.55 narrow .. 1.3 wide
    wrinkle: float  # 0 .. 1 nose wrinkles
    sneer: float  # 0 .. 1 upper lip raised on one side


PROTOTYPES: dict[str, Expression] = {
    "surprise": Expression(0.9, 0.0, 1.45, 0.0, 0.9, 0.6, 0.0, 0.0),
    "fear": Expression(0.6, 0.8, 1.3, -0.35, 0.45, 1.2, 0.0, 0.0),
    "disgust": Expression(-0.45, -0.2, 0.5, -0.45, 0.15, 0.9, 1.0, 1.0),
    "happy": Expression(0.1, 0.0, 0.7, 0.95, 0.35, 1.2, 0.0, 0.0),
    "sad": Expression(-0.05, 0.85, 0.75, -0.85, 0.0, 0.85, 0.0, 0.0),
    "anger": Expression(-0.85, -0.9, 0.6, -0.2, 0.08, 0.8, 0.2, 0.0),
    "neutral": Expression(0.0, 0.0, 1.0, 0.0, 0.0, 0.9, 0.0, 0.0),
}
NOISE = Expression(0.22, 0.22, 0.18, 0.22, 0.1, 0.1, 0.15, 0.15)
LIMITS = Expression((-1, 1), (-1, 1), (0.3, 1.6), (-1, 1), (0, 1), (0.5, 1.35), (0, 1), (0, 1))  # type: ignore[arg-type]

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 96), (161, 102, 70), (112, 72, 50),
        (80, 52, 38)]
BACKGROUND_WORDS = {"red": (190, 60, 60), "green": (70, 150, 80), "blue": (60, 90, 180), "yellow": (220, 200, 80),
                    "grey": (128, 128, 128), "purple": (130, 80, 160), "white": (235, 235, 235)}


def sample_expression(name: str, rng: random.Random) -> Expression:
    proto = PROTOTYPES[name]
    values = {}
    for f in fields(Expression):
        lo, hi = getattr(LIMITS, f.name)
        values[f.name] = min(hi, max(lo, getattr(proto, f.name) + rng.gauss(0, getattr(NOISE, f.name))))
    return Expression(**values)


@dataclass
class Look:
    """Everything about a picture that is not the expression."""

    skin: tuple[int, int, int]
    dark_skin: bool
    background: str
    scale: float  # face half-width as a fraction of the image
    dx: float
    dy: float
    angle: float
    hair: bool
    glasses: bool
    occluder: bool
    noise: float
    blur: bool


def sample_look(rng: random.Random) -> Look:
    # Nuisance is kept moderate: with +-15 degree rotations, heavy noise and large occluders the
    # small demo ViT needs several times longer before contrastive pretraining takes off.
    k = rng.randrange(len(SKIN))
    return Look(
        skin=tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in SKIN[k]),  # type: ignore[arg-type]
        dark_skin=k >= 4,
        background=rng.choice(list(BACKGROUND_WORDS)),
        scale=rng.uniform(0.34, 0.4),
        dx=rng.uniform(-0.04, 0.04),
        dy=rng.uniform(-0.04, 0.04),
        angle=rng.uniform(-8, 8),
        hair=rng.random() < 0.6,
        glasses=rng.random() < 0.1,
        occluder=rng.random() < 0.1,
        noise=rng.uniform(0.0, 6.0),
        blur=rng.random() < 0.1,
    )


def _background(size: int, look: Look, rng: random.Random) -> Image.Image:
    base = np.array(BACKGROUND_WORDS[look.background], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.randrange(3)
    if kind == 0:
        shade = np.zeros((size, size), np.float32)
    elif kind == 1:
        shade = 40 * (xx * math.cos(rng.uniform(0, 6.3)) + yy * math.sin(rng.uniform(0, 6.3)) - 0.5)
    else:
        shade = 18 * np.sin(rng.uniform(8, 20) * (xx + rng.uniform(-1, 1) * yy))
    img = np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _arc_points(cx: float, cy: float, half: float, bend: float, n: int = 12) -> list[tuple[float, float]]:
    """A parabola from (cx - half, cy) to (cx + half, cy); bend > 0 lifts the ends (a smile)."""
    return [(cx + t * half, cy - bend * (t * t - 1) - bend) for t in np.linspace(-1, 1, n)]


def draw_face(expr: Expression, look: Look, size: int, rng: random.Random) -> Image.Image:
    """Draw at twice the size and downsample, for smooth edges."""
    s = 2 * size
    canvas = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    cx, cy = s / 2, s / 2 + 0.04 * s
    r = look.scale * s  # half-width of the face
    h = 1.28 * r
    line = max(2, round(0.035 * r))
    ink = (40, 28, 24, 255)
    if look.hair:
        hair = tuple(rng.randint(10, 90) for _ in range(3)) + (255,)
        d.ellipse([cx - 1.08 * r, cy - 1.12 * h, cx + 1.08 * r, cy + 0.2 * h], fill=hair)
    d.ellipse([cx - r, cy - h, cx + r, cy + h], fill=look.skin + (255,))

    # eyes
    eye_y = cy - 0.22 * h
    eye_w = 0.2 * r
    eye_h = 0.11 * r * expr.eye_open
    for side in (-1, 1):
        ex = cx + side * 0.4 * r
        d.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=(250, 250, 250, 255), outline=ink,
                  width=line)
        pr = min(0.09 * r, eye_h * 0.95)
        d.ellipse([ex - pr, eye_y - pr, ex + pr, eye_y + pr], fill=(30, 30, 40, 255))
        # brows: inner end (towards the nose) moves with the slant, the whole brow with the raise
        base = eye_y - 0.26 * r - 0.16 * r * expr.brow_raise
        inner = (cx + side * 0.16 * r, base - 0.13 * r * expr.brow_slant)
        outer = (cx + side * 0.64 * r, base + 0.05 * r * expr.brow_slant)
        d.line([inner, outer], fill=ink, width=2 * line)
    if look.glasses:
        for side in (-1, 1):
            ex = cx + side * 0.4 * r
            d.ellipse([ex - 0.3 * r, eye_y - 0.24 * r, ex + 0.3 * r, eye_y + 0.24 * r], outline=(20, 20, 20, 255),
                      width=line)
        d.line([(cx - 0.1 * r, eye_y), (cx + 0.1 * r, eye_y)], fill=(20, 20, 20, 255), width=line)

    # nose and its wrinkles
    nose_top, nose_bottom = cy - 0.1 * h, cy + 0.2 * h
    d.line([(cx, nose_top), (cx - 0.08 * r, nose_bottom), (cx + 0.06 * r, nose_bottom)], fill=ink, width=line)
    for k in range(round(3 * expr.wrinkle)):
        y = nose_top + 0.05 * h * k
        d.line([(cx - 0.12 * r, y), (cx - 0.03 * r, y - 0.03 * r)], fill=ink, width=line)
        d.line([(cx + 0.03 * r, y - 0.03 * r), (cx + 0.12 * r, y)], fill=ink, width=line)

    # mouth: an upper lip arc and a lower lip arc; the gap between them is the opening
    my = cy + 0.5 * h
    half = 0.32 * r * expr.mouth_width
    bend = 0.14 * r * expr.mouth_curve
    gap = 0.3 * r * expr.mouth_open
    upper = _arc_points(cx, my - gap / 2, half, bend)
    lower = _arc_points(cx, my + gap / 2, half, bend + (0.35 * gap if expr.mouth_curve > 0 else 0.0))
    if expr.sneer > 0.05:
        upper = [(x, y - 0.12 * r * expr.sneer * max(0.0, (x - cx) / half)) for x, y in upper]
    if gap > line:
        d.polygon(upper + lower[::-1], fill=(90, 20, 30, 255))
        if expr.mouth_curve > 0.4:  # teeth in a smile
            d.polygon(upper + [(x, y + 0.3 * gap) for x, y in upper[::-1]], fill=(245, 245, 240, 255))
    d.line(upper, fill=ink, width=line, joint="curve")
    d.line(lower, fill=ink, width=line, joint="curve")

    canvas = canvas.rotate(look.angle, resample=Image.BICUBIC, center=(cx, cy),
                           translate=(look.dx * s, look.dy * s))
    img = _background(s, look, rng)
    img.paste(canvas, (0, 0), canvas)
    if look.occluder:
        d2 = ImageDraw.Draw(img)
        color = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.uniform(0, s * 0.8), rng.uniform(0, s * 0.8)
        w, hh = rng.uniform(0.1, 0.2) * s, rng.uniform(0.1, 0.2) * s
        d2.rectangle([x0, y0, x0 + w, y0 + hh], fill=color)
    img = img.resize((size, size), Image.LANCZOS)
    if look.blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9)))
    if look.noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr += np.random.default_rng(rng.randrange(2**31)).normal(0, look.noise, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


PHRASES = {
    "brows_inner_up": ["eyebrows slanting up in the middle", "inner brows lifted"],
    "brows_v": ["eyebrows drawn together into a v", "brows pulled down and together"],
    "brows_raised": ["raised eyebrows", "high arched brows"],
    "brows_lowered": ["lowered eyebrows", "low heavy brows"],
    "eyes_wide": ["wide open eyes", "big staring eyes"],
    "eyes_narrow": ["narrowed eyes", "squinting eyes"],
    "mouth_round": ["an open round mouth", "a mouth open in an o"],
    "mouth_open": ["an open mouth", "parted lips"],
    "corners_up": ["mouth corners turned up", "an upward curved mouth"],
    "corners_down": ["mouth corners turned down", "a downward curved mouth"],
    "mouth_wide": ["a wide mouth", "lips stretched wide"],
    "nose_wrinkled": ["a wrinkled nose", "lines across the nose"],
    "lip_raised": ["the upper lip raised on one side", "a curled upper lip"],
    "calm": ["relaxed brows and a closed mouth", "a still face with closed lips"],
}


def attributes(expr: Expression) -> list[str]:
    """The visible facial features, as keys of :data:`PHRASES`."""
    found = []
    if expr.brow_slant > 0.45:
        found.append("brows_inner_up")
    elif expr.brow_slant < -0.45:
        found.append("brows_v")
    if expr.brow_raise > 0.45:
        found.append("brows_raised")
    elif expr.brow_raise < -0.4:
        found.append("brows_lowered")
    if expr.eye_open > 1.2:
        found.append("eyes_wide")
    elif expr.eye_open < 0.8:
        found.append("eyes_narrow")
    if expr.mouth_open > 0.6 and expr.mouth_width < 0.8:
        found.append("mouth_round")
    elif expr.mouth_open > 0.3:
        found.append("mouth_open")
    if expr.mouth_curve > 0.45:
        found.append("corners_up")
    elif expr.mouth_curve < -0.45:
        found.append("corners_down")
    if expr.mouth_width > 1.1:
        found.append("mouth_wide")
    if expr.wrinkle > 0.5:
        found.append("nose_wrinkled")
    if expr.sneer > 0.5:
        found.append("lip_raised")
    return found or ["calm"]


def describe(expr: Expression, look: Look, rng: random.Random) -> str:
    """An appearance caption: what the face looks like, never which emotion it shows."""
    parts = [rng.choice(PHRASES[a]) for a in attributes(expr)]
    rng.shuffle(parts)
    features = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    # Only now and then the colours: captions that name them let the contrastive task be solved
    # by colour alone, and the expression geometry is what the text tower must learn.
    if rng.random() < 0.2:
        features += f", {'dark' if look.dark_skin else 'light'} skin on {look.background}"
    template = rng.choice(["a face with {f}", "a drawing of a face with {f}", "{f}"])
    return template.format(f=features)


@dataclass
class Face:
    image: Image.Image
    label: int  # class index
    caption: str  # appearance description, no emotion word
    attributes: tuple[str, ...]  # canonical features the caption names


def make_face(i: int, seed: int, size: int, classes: Sequence[str] = RAFDB_CLASSES) -> Face:
    """Face number ``i`` of a generated set: classes in turn, reproducible from (seed, i)."""
    rng = random.Random(seed * 1_000_003 + i)
    label = i % len(classes)
    expr, look = sample_expression(classes[label], rng), sample_look(rng)
    image = draw_face(expr, look, size, rng)
    return Face(image, label, describe(expr, look, rng), tuple(sorted(attributes(expr))))


def generate(n: int, seed: int, size: int, classes: Sequence[str] = RAFDB_CLASSES, workers: int = 1
             ) -> list[Face]:
    """``n`` faces; with ``workers`` > 1 drawn in parallel processes (same result)."""
    if workers <= 1 or n < 64:
        return [make_face(i, seed, size, classes) for i in range(n)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(make_face, range(n), [seed] * n, [size] * n, [tuple(classes)] * n, chunksize=64))


def write_rafdb_dataset(root: str | Path, n_train: int, n_test: int, seed: int = 0, size: int = 64,
                        workers: int = 1) -> Path:
    """A generated dataset in the exact RAF-DB layout: ``EmoLabel/*.txt`` + ``Image/aligned_224/``."""
    root = Path(root)
    images_dir = root / "Image" / "aligned_224"
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel").mkdir(exist_ok=True)
    lines: dict[str, list[str]] = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for split, n, split_seed in (("train", n_train, 2 * seed), ("test", n_test, 2 * seed + 1)):
        for i, face in enumerate(generate(n, split_seed + 7919, size, workers=workers)):
            name = f"{split}_{i + 1:05d}_aligned.jpg"
            face.image.save(images_dir / name, quality=92)
            label = face.label
            key = str(len(lines["images.txt"]) + 1)
            lines["images.txt"].append(f"{key} {name}")
            lines["image_class_labels.txt"].append(f"{key} {label + 1}")  # RAF-DB labels are 1-based
            lines["train_test_split.txt"].append(f"{key} {int(split == 'train')}")
    for name, rows in lines.items():
        (root / "EmoLabel" / name).write_text("\n".join(rows) + "\n")
    return root
