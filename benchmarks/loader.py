"""Images per second one data-loader process prepares for training (decode, resize, augment, to a tensor), for
RAF-DB-sized and AffectNet-sized JPEGs, and the processes a GPU node needs to feed 3,000 img/s.

RAF-DB's aligned faces are 100x100 JPEGs (resized up to 224); AffectNet's manually annotated faces are JPEGs of a
few hundred pixels (450x450 here) with its affine and erasing augmentation. Each is measured with the JPEG decoded
whole (ceprompt 0.3) and at the scale nearest the model's input (libjpeg's scaled decoding, what datasets use
now). Each case runs ``FERDataset`` exactly as training does, in this one process (one loader worker's share), on generated photo-like JPEGs:

    python benchmarks/loader.py       # writes benchmarks/results/loader.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceprompt.data.datasets import FERDataset, Sample, default_augment  # noqa: E402
from ceprompt.data.transforms import preprocess_for, train_augment  # noqa: E402

from bench_common import cpu_description  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "loader.json"
TARGET = 3000  # img/s a fast GPU node's training steps can take (ViT-B/16 stage 1 at the paper's batch)


def photo_like(size: int, seed: int) -> Image.Image:
    """A face-sized JPEG's worth of texture: smooth shading plus noise (what JPEG decoders work through)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([120 + 80 * x, 100 + 60 * y, 90 + 40 * x * y], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def per_worker(size: int, augment: str, scaled: bool, n: int = 200, repeats: int = 3) -> float:
    pre = preprocess_for(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(n):
            path = Path(tmp) / f"{i}.jpg"
            photo_like(size, i).save(path, quality=90)
            samples.append(Sample(str(path), i % 7))
        dataset = FERDataset(samples, pre.resize(), train_augment(augment, pre), size=224 if scaled else None)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(n):
                dataset[(i, i)]
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    torch.set_num_threads(1)  # a loader process computes on one thread
    cases = {"RAF-DB (100 px JPEG, flip)": (100, default_augment("rafdb")),
             "AffectNet (450 px JPEG, affine + erasing)": (450, default_augment("affectnet7"))}
    cpu, flags = cpu_description()
    results: dict = {"cpu": cpu, "cpu_flags": flags, "target_img_s": TARGET, "cases": {}}
    for name, (size, augment) in cases.items():
        for scaled in (False, True):  # JPEGs decoded whole, or at the scale nearest the model's input
            rate = per_worker(size, augment, scaled)
            workers = math.ceil(TARGET / rate)
            label = f"{name}, {'scaled decoding' if scaled else 'whole decoding'}"
            results["cases"][label] = {"img_s_per_worker": round(rate, 1), "workers_for_target": workers}
            print(f"{label:64s} {rate:7.1f} img/s per loader process -> {workers} processes for {TARGET} img/s")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
