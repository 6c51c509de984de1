"""MTCNN and CenterFace on real photos that packages ship: faces found, where, and time per megapixel.

Photos: scikit-image's astronaut (frontal) and cameraman (turned away from the camera, looking into the
viewfinder), matplotlib's Grace Hopper portrait, each also mirrored, turned by 30 and 60 degrees, darkened and
with the right 45% of the face hidden; a group picture
composed of all three at several sizes; a 1920x1080 "phone" frame with the three of them small; and 40 of the
LFW faces scikit-image ships (25x25 crops, enlarged 4x and laid out on a grid). Expected faces are known by
construction (one per photo, each placed face in the compositions).

    python benchmarks/detectors.py            # writes benchmarks/results/detectors.json

A face counts as found when a box's centre lies inside the known face region. Time: median of 5 runs per image
after one warm-up, on this machine's cores (the number used is printed).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceprompt.data.faces import FaceDetector  # noqa: E402

from bench_common import cpu_description  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "detectors.json"
Region = tuple[float, float, float, float]


def _photos() -> dict[str, tuple[Image.Image, Region]]:
    """name -> (photo, the face's region): regions drawn by hand around each face, generously."""
    import matplotlib
    from skimage import data

    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return {"astronaut": (Image.fromarray(data.astronaut()), (160, 40, 290, 200)),
            "cameraman": (Image.fromarray(data.camera()).convert("RGB"), (190, 100, 270, 210)),
            "grace_hopper": (hopper, (150, 60, 380, 360))}


def _variants(photo: Image.Image, region: Region) -> dict[str, tuple[Image.Image, list[Region]]]:
    w = photo.width
    x0, y0, x1, y1 = region
    mirrored = photo.transpose(Image.FLIP_LEFT_RIGHT)
    out = {"": (photo, [region]), " mirrored": (mirrored, [(w - x1, y0, w - x0, y1)])}
    for angle in (30, 60):  # turned about the face's centre: the region stays
        turned = photo.rotate(angle, resample=Image.BICUBIC, expand=False, center=((x0 + x1) / 2, (y0 + y1) / 2))
        out[f" turned {angle}deg"] = (turned, [region])
    dark = Image.fromarray((255 * (np.asarray(photo, np.float32) / 255) ** 2.2 * 0.5).astype(np.uint8))
    out[" dark"] = (dark, [region])
    hidden = photo.copy()
    hidden.paste((90, 90, 90), (round(x0 + 0.55 * (x1 - x0)), round(y0), round(x1) + 10, round(y1)))
    out[" right 45% hidden"] = (hidden, [region])
    return out


def _compose(size: tuple[int, int], placed: list[tuple[Image.Image, Region, tuple[int, int], float]]
             ) -> tuple[Image.Image, list[Region]]:
    canvas = Image.new("RGB", size, (120, 130, 140))
    regions = []
    for photo, (x0, y0, x1, y1), (px, py), scale in placed:
        crop = photo.crop((max(0, x0 - 40), max(0, y0 - 40), min(photo.width, x1 + 40), min(photo.height, y1 + 40)))
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
        canvas.paste(crop, (px, py))
        ox, oy = max(0, x0 - 40), max(0, y0 - 40)
        regions.append((px + (x0 - ox) * scale, py + (y0 - oy) * scale, px + (x1 - ox) * scale,
                        py + (y1 - oy) * scale))
    return canvas, regions


def cases() -> dict[str, tuple[Image.Image, list[Region]]]:
    photos = _photos()
    out: dict[str, tuple[Image.Image, list[Region]]] = {}
    for name, (photo, region) in photos.items():
        for suffix, case in _variants(photo, region).items():
            out[name + suffix] = case
    a, c, g = photos["astronaut"], photos["cameraman"], photos["grace_hopper"]
    out["group of 3"] = _compose((900, 420), [(a[0], a[1], (20, 40), 1.0), (c[0], c[1], (330, 60), 1.2),
                                              (g[0], g[1], (600, 30), 0.7)])
    out["phone frame, small faces"] = _compose((1920, 1080), [(a[0], a[1], (200, 500), 0.45),
                                                              (c[0], c[1], (900, 420), 0.5),
                                                              (g[0], g[1], (1500, 300), 0.3)])
    return out


def lfw_grid() -> tuple[Image.Image, list[Region]]:
    from skimage import data

    faces = data.lfw_subset()[:40]  # the first 100 of the 200 are faces, the rest are not
    cell, cols = 100, 8
    canvas = Image.new("RGB", (cols * cell, (len(faces) // cols) * cell), (128, 128, 128))
    regions = []
    for i, face in enumerate(faces):
        tile = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((cell, cell), Image.BICUBIC)
        x, y = (i % cols) * cell, (i // cols) * cell
        canvas.paste(tile, (x, y))
        regions.append((x, y, x + cell, y + cell))
    return canvas, regions


def _inside(box: tuple[float, float, float, float], region: Region) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def measure(detector: FaceDetector, image: Image.Image, regions: list[Region]) -> dict:
    faces = detector.detect(image)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        detector.detect(image)
        times.append(time.perf_counter() - start)
    found = sum(any(_inside(f.box, r) for f in faces) for r in regions)
    extra = sum(not any(_inside(f.box, r) for r in regions) for f in faces)
    megapixels = image.width * image.height / 1e6
    return {"faces": len(regions), "found": found, "false_boxes": extra,
            "boxes": [[round(v, 1) for v in f.box] + [round(f.confidence or 0, 3)] for f in faces],
            "seconds": round(statistics.median(times), 4),
            "seconds_per_megapixel": round(statistics.median(times) / megapixels, 4)}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    all_cases = {k: v for k, v in cases().items()}
    all_cases["40 LFW faces (25 px, shown 4x)"] = lfw_grid()
    detectors = {"mtcnn": FaceDetector("cpu", method="mtcnn"), "centerface": FaceDetector("cpu", method="centerface")}
    cpu, flags = cpu_description()
    results: dict = {"cpu": cpu, "cpu_flags": flags,
                     "threads": torch.get_num_threads(), "cases": {}}
    print(f"{'photo':34s} {'size':>10s} " + " ".join(f"{name:>28s}" for name in detectors))
    for name, (image, regions) in all_cases.items():
        row = {method: measure(det, image, regions) for method, det in detectors.items()}
        results["cases"][name] = {"size": list(image.size), **row}
        cells = " ".join(f"{r['found']:>3d}/{r['faces']:<3d} +{r['false_boxes']} {r['seconds_per_megapixel']:7.3f} s/MP   "
                         for r in row.values())
        print(f"{name:34s} {image.width:>4d}x{image.height:<5d} {cells}")
    totals = {m: {"found": sum(c[m]["found"] for c in results["cases"].values()),
                  "faces": sum(c[m]["faces"] for c in results["cases"].values()),
                  "false_boxes": sum(c[m]["false_boxes"] for c in results["cases"].values()),
                  "median_seconds_per_megapixel": statistics.median(
                      c[m]["seconds_per_megapixel"] for c in results["cases"].values())} for m in detectors}
    results["totals"] = totals
    for m, t in totals.items():
        print(f"{m}: {t['found']}/{t['faces']} faces found, {t['false_boxes']} boxes elsewhere, median "
              f"{t['median_seconds_per_megapixel']:.3f} s per megapixel")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
