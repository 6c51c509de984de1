"""Small generated datasets in the real directory layouts, for the data and engine tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ceprompt.data.datasets import LAYOUTS


def class_image(label: int, n_classes: int, seed: int, size: int = 24) -> Image.Image:
    """A noisy image whose colour and stripe orientation depend on the class (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    hue = np.array([np.cos(2 * np.pi * label / n_classes), np.sin(2 * np.pi * label / n_classes), 0.5])
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / n_classes
    stripes = np.sin(12 * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    img = 0.5 + 0.25 * hue[None, None, :] + 0.15 * stripes + 0.1 * rng.standard_normal((size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def write_three_file_dataset(root: Path, dataset: str, n_train: int = 3, n_test: int = 2, size: int = 24) -> Path:
    """A dataset in ``dataset``'s layout with n_train/n_test images per class."""
    layout = LAYOUTS[dataset]
    image_root = root / layout.image_dirs[0]
    info = root / layout.info_dir
    info.mkdir(parents=True, exist_ok=True)
    images, labels, split = [], [], []
    n_classes = len(layout.class_names)
    k = 0
    for label in range(n_classes):
        for j in range(n_train + n_test):
            k += 1
            is_train = j < n_train
            rel = (f"train_{k:05d}_aligned.jpg" if dataset == "rafdb"
                   else f"Manually_Annotated_Images/{label}/img_{k:05d}.png")
            path = image_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            class_image(label, n_classes, seed=k, size=size).save(path)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {label + layout.label_offset}")
            split.append(f"{k} {int(is_train)}")
    for name, lines in zip(layout.files, (images, labels, split)):
        (info / name).write_text("\n".join(lines) + "\n")
    return root


def write_folder_dataset(root: Path, classes: list[str], n_train: int = 3, n_test: int = 2, size: int = 24) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                class_image(label, len(classes), seed=hash((split, label, j)) % 10_000, size=size).save(
                    folder / f"{j}.png")
    return root


def set_args(values: list[str]) -> list[str]:
    """``--set`` before each value, as the command line takes config overrides."""
    return [arg for value in values for arg in ("--set", value)]


def quick_train_sets(data: Path, output_dir: Path, name: str, *extra: str, epochs: int = 1) -> list[str]:
    """``--set`` arguments for a training of seconds on generated data in ``output_dir/name``. The backbone is
    left to ``extra`` (a stage-2 run takes its stage 1's); ``extra`` values come last, so they win."""
    return set_args([f"data.root={data}", "data.workers=0", f"optim.epochs={epochs}", "optim.batch_size=7",
                     "optim.warmup_epochs=0", f"run.output_dir={output_dir}", f"run.name={name}", "run.device=cpu",
                     "run.progress=false", "head.top_k=4", *extra])


def train_tiny_runs(root: Path, n_train: int = 2, epochs: int = 1, threads: int = 0) -> dict[str, Path]:
    """A stage-1 and a stage-2 run of the tiny CLIP on generated RAF-DB-layout data (seconds on a CPU).
    ``threads``: fixed, for the same weights whatever the machine's load (0: chosen from the load)."""
    from ceprompt.cli import main

    data = write_three_file_dataset(root / "RAF-DB", "rafdb", n_train=n_train, n_test=1)
    def sets(name: str) -> list[str]:
        return quick_train_sets(data, root, name, "backbone.arch=tiny-vit", "cat.prompt_depth=3",
                                f"run.threads={threads}", epochs=epochs)

    assert main(["train", "--config", "rafdb_stage1", *sets("s1")]) == 0
    assert main(["train", "--config", "rafdb_stage2", "--init", str(root / "s1"), *sets("s2")]) == 0
    return {"s1": root / "s1", "s2": root / "s2", "data": data}


def precision_agreement(model: Path, images: list) -> tuple[float, float]:
    """Share of equal labels and the largest probability difference, bf16 against fp32, on ``images``."""
    import ceprompt

    probs = {}
    for precision in ("fp32", "bf16"):
        rec = ceprompt.load(model, device="cpu", precision=precision)
        faces = rec.predict_batch(images, detect="none")
        probs[precision] = np.array([[f[0].probabilities[c] for c in rec.class_names] for f in faces])
    same = (probs["fp32"].argmax(1) == probs["bf16"].argmax(1)).mean()
    return float(same), float(np.abs(probs["fp32"] - probs["bf16"]).max())


def rows_of(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file a verb wrote (names kept byte for byte, as predict writes them)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))
