"""The FER datasets: layouts, class orders, index validation and the torch Dataset.

Layouts (docs/method.md section 4), all read through the three-file index:

=============  ============================  =========================  ======
dataset        index files                   image paths relative to    labels
=============  ============================  =========================  ======
rafdb          ``EmoLabel/*.txt``            ``Image/aligned_224/``     1..7
affectnet7     ``affectnet_info/*.txt``      dataset root               0..6
affectnet8     ``affectnet_info/*_8cls.txt`` dataset root               0..7
ferplus        ``ferplus_info/*.txt``        dataset root               0..7
=============  ============================  =========================  ======

plus ``folder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``, one folder per class.
"""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import DataError
from ..core.paths import escapes
from .class_names import MAX_CLASSES, canonical
from .images import IMAGE_SUFFIXES, ImageInfo, open_image, probe_image
from .three_files import IMAGES, LABELS, SPLIT, Problems, read_index

log = logging.getLogger(__name__)

RAFDB_CLASSES = ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral")
AFFECTNET7_CLASSES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
AFFECTNET8_CLASSES = AFFECTNET7_CLASSES + ("contempt",)
FERPLUS_CLASSES = ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt")


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    class_names: tuple[str, ...]
    info_dir: str  # folder of the three index files, relative to the root
    files: tuple[str, str, str]  # images, labels, split file names
    label_offset: int  # file label - offset = class index
    image_dirs: tuple[str, ...]  # candidate image folders relative to the root; the first that exists is used
    augment: str  # default augmentation
    balanced: bool  # class-balanced sampling by default


_8CLS = ("images_8cls.txt", "image_class_labels_8cls.txt", "train_test_split_8cls.txt")
LAYOUTS: dict[str, DatasetLayout] = {
    "rafdb": DatasetLayout("rafdb", RAFDB_CLASSES, "EmoLabel", (IMAGES, LABELS, SPLIT), 1,
                           ("Image/aligned_224", "Image/aligned"), "rafdb", False),
    "affectnet7": DatasetLayout("affectnet7", AFFECTNET7_CLASSES, "affectnet_info", (IMAGES, LABELS, SPLIT), 0,
                                ("",), "affectnet", True),
    "affectnet8": DatasetLayout("affectnet8", AFFECTNET8_CLASSES, "affectnet_info", _8CLS, 0,
                                ("",), "affectnet", True),
    "ferplus": DatasetLayout("ferplus", FERPLUS_CLASSES, "ferplus_info", (IMAGES, LABELS, SPLIT), 0,
                             ("",), "rafdb", False),
}
DATASET_NAMES = (*LAYOUTS, "folder")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class Splits:
    """A dataset read and checked: its class order and its train and test samples."""

    name: str
    root: Path
    class_names: list[str]
    train: list[Sample]
    test: list[Sample]
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images left out
    val: list[Sample] = field(default_factory=list)  # held out of train to choose the epoch (data.val_fraction)


def default_augment(dataset: str) -> str:
    return LAYOUTS[dataset].augment if dataset in LAYOUTS else "rafdb"


def default_balanced(dataset: str) -> bool:
    return LAYOUTS[dataset].balanced if dataset in LAYOUTS else False


def class_names_of(dataset: str) -> list[str]:
    if dataset not in LAYOUTS:
        raise DataError(f"dataset {dataset!r} has no fixed class order; expected one of {list(LAYOUTS)}")
    return list(LAYOUTS[dataset].class_names)


def _image_root(root: Path, layout: DatasetLayout, image_dir: str | None, problems: Problems) -> Path:
    if image_dir is not None:
        folder = root / image_dir
        if not folder.is_dir():
            problems.add(f"{folder}: image folder not found")
        return folder
    for candidate in layout.image_dirs:
        if (root / candidate).is_dir():
            return root / candidate
    wanted = " or ".join(str(root / c) for c in layout.image_dirs)
    problems.add(f"{wanted}: image folder not found")
    return root / layout.image_dirs[0]


def _index_splits(root: Path, layout: DatasetLayout, image_dir: str | None, problems: Problems,
                  allow_outside_root: bool = False) -> Splits:
    image_root = _image_root(root, layout, image_dir, problems)
    info = root / layout.info_dir
    if not info.is_dir():
        problems.add(f"{info}: index folder not found (expected {', '.join(layout.files)} inside)")
        return Splits(layout.name, root, list(layout.class_names), [], [])
    records = read_index(info, layout.files, problems)
    n_classes = len(layout.class_names)
    lo, hi = layout.label_offset, layout.label_offset + n_classes - 1
    train, test = [], []
    outside = [rec for rec in records if escapes(rec.path)]
    if outside:
        example = f"id {outside[0].id!r}: {outside[0].path!r}"
        message = (f"{info / layout.files[0]}: {len(outside)} image path(s) are absolute or leave the image folder "
                   f"through '..' (e.g. {example})")
        if not allow_outside_root:
            problems.add(f"{message}; set data.allow_outside_root=true (--allow-outside-root) if this is intended")
            return Splits(layout.name, root, list(layout.class_names), [], [])
        log.warning("%s; reading them because data.allow_outside_root is set", message)
    for rec in records:
        index = rec.label - layout.label_offset
        if not 0 <= index < n_classes:
            problems.add(f"{info / layout.files[1]}:{rec.label_line}: id {rec.id!r} has label {rec.label}, outside {lo}..{hi} "
                         f"for {layout.name} ({n_classes} classes)")
            continue
        (train if rec.is_train else test).append(Sample(str(image_root / rec.path), index))
    return Splits(layout.name, root, list(layout.class_names), train, test)


def _folder_splits(root: Path, classes: Sequence[str] | None, problems: Problems) -> Splits:
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            problems.add(f"{d}: missing (a folder dataset needs train/<class>/ and test/<class>/)")
    if problems:
        return Splits("folder", root, list(classes or []), [], [])
    found = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    names = list(classes) if classes else found
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.add(f"data.classes lists {name!r} more than once")
    same: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):  # Happy/happy, happy face/happy_face, joy/happy: one class, one prompt
        same.setdefault(canonical(name), []).append(name)
    for group in same.values():
        if len(group) > 1:
            problems.add(f"{train_dir}: classes {' and '.join(repr(n) for n in group)} are the same class (after "
                         "case, separators and the alias table); merge their folders or rename one")
    if len(names) > MAX_CLASSES:
        problems.add(f"{train_dir}: {len(names):,} classes; at most {MAX_CLASSES:,}")
    for name in names:
        if not name or name in (".", "..") or escapes(name) or Path(name).name != name:
            problems.add(f"data.classes: {name!r} is not a plain folder name under {train_dir}")
    if len(set(names)) < 2:
        problems.add(f"{train_dir}: {len(set(names))} class(es) {sorted(set(names))}; a classifier needs at least 2")
    if problems:
        return Splits("folder", root, names, [], [])
    for name in sorted(set(found) - set(names)):
        problems.add(f"{train_dir / name}: class folder not in data.classes {names}")
    for name in names:
        if not (train_dir / name).is_dir():
            problems.add(f"{train_dir / name}: missing folder for class {name!r}")
    for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        if d.name not in names:
            problems.add(f"{d}: test class {d.name!r} has no training folder")

    def collect(split_dir: Path) -> list[Sample]:
        out = []
        for index, name in enumerate(names):
            folder = split_dir / name
            if folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                out.extend(Sample(str(p), index) for p in files)
        return out

    return Splits("folder", root, names, collect(train_dir), collect(test_dir))


def scan_images(samples: Sequence[Sample], full: bool = False, workers: int = 8) -> list[ImageInfo]:
    """Probe every image (header and pixel limit; with ``full`` every pixel), in parallel threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: probe_image(s.path, full), samples))


def index_dataset(dataset: str, root: str | os.PathLike, image_dir: str | None = None,
                  classes: Sequence[str] | None = None, problems: Problems | None = None,
                  allow_outside_root: bool = False) -> Splits:
    """Read the index (or folders) of a dataset; problems go to ``problems``; images are not opened."""
    root = Path(root).expanduser()
    problems = problems if problems is not None else Problems()
    if dataset not in DATASET_NAMES:
        raise DataError(f"data.dataset={dataset!r}; expected one of {list(DATASET_NAMES)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root folder not found")
    if dataset == "folder":
        splits = _folder_splits(root, classes, problems)
    else:
        splits = _index_splits(root, LAYOUTS[dataset], image_dir, problems, allow_outside_root)
    test_files = {os.path.normpath(s.path) for s in splits.test}
    both = sorted({s.path for s in splits.train if os.path.normpath(s.path) in test_files})
    if both:
        problems.add(f"{len(both)} image file(s) are in both the training and the test split (the test would "
                     f"measure memory, not recognition), e.g. {both[0]}")
    return splits


def load_splits(
    dataset: str,
    root: str | os.PathLike,
    image_dir: str | None = None,
    classes: Sequence[str] | None = None,
    verify_images: bool = True,
    skip_bad_images: bool = False,
    workers: int = 8,
    allow_outside_root: bool = False,
) -> Splits:
    """Read, validate and split a dataset. Every problem found is listed in one DataError;
    with ``skip_bad_images`` every image is decoded first (truncated files are found only that way)
    and missing or unreadable images are left out and recorded instead."""
    problems = Problems()
    splits = index_dataset(dataset, root, image_dir, classes, problems, allow_outside_root)
    samples = splits.train + splits.test  # what the index gives despite its problems: all are reported at once
    if verify_images or skip_bad_images:
        reasons = [info.problem for info in scan_images(samples, full=skip_bad_images, workers=workers)]
    else:
        reasons = [None if os.path.exists(s.path) else "missing image file" for s in samples]
    bad = {s.path: r for s, r in zip(samples, reasons) if r}
    if bad and not skip_bad_images:
        for path, reason in bad.items():
            problems.add(f"{path}: {reason}")
    hint = " (--skip-bad-images leaves unreadable images out)" if bad and not skip_bad_images else ""
    problems.raise_if_any(f"dataset {dataset} at {splits.root}{hint}")
    if bad:
        splits.train = [s for s in splits.train if s.path not in bad]
        splits.test = [s for s in splits.test if s.path not in bad]
        splits.skipped = [f"{p}: {r}" for p, r in bad.items()]
        log.warning("left out %d unreadable or missing images", len(bad))
    if not splits.train and not splits.test:
        raise DataError(f"dataset {dataset} at {splits.root}: no images")
    return splits


def validation_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation): per class, ``fraction`` of its images (at least one of a class with two or more,
    always one left to train) drawn with ``seed``; ``fraction`` 0 keeps them all for training."""
    if fraction <= 0:
        return list(samples), []
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_class):
        indices = by_class[label]
        k = min(max(round(fraction * len(indices)), 1 if len(indices) > 1 else 0), len(indices) - 1)
        held.update(rng.sample(indices, k))
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


class FERDataset(Dataset):
    """Samples as mappings: ``image`` (tensor), ``label`` (class index), ``index`` (sample index) and ``flip``: 1 or
    0 when the augmentation's only random choice was a horizontal flip (the image is one of the sample's two
    repeatable views), -1 otherwise (see :class:`ceprompt.data.transforms.Augment`).

    ``resize`` is the deterministic first step (to the model's input size); ``augment`` the rest.
    With ``cache`` the resized images are decoded once, in the main process, and shared with
    the loader processes.
    """

    def __init__(self, samples: Sequence[Sample], resize: Callable, augment: Callable, cache: bool = False,
                 workers: int = 8, size: int | None = None) -> None:
        self.samples = list(samples)
        self.resize, self.augment, self.size = resize, augment, size  # size: the model's input, for scaled decoding
        self.cache: list[Image.Image] | None = None
        if cache:
            with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
                self.cache = list(pool.map(self._load, self.samples))

    def _load(self, sample: Sample) -> Image.Image:
        return self.resize(open_image(sample.path, at_least=self.size))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        """``key``: a sample index, or (index, draw seed) from :class:`~ceprompt.data.samplers.TrainSampler`, whose
        seed alone decides the random augmentation (not the loader process's random state)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        image = self.cache[index] if self.cache is not None else self._load(sample)
        if seed is None:
            tensor, flip = self.augment(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tensor, flip = self.augment(image)
        return {"image": tensor, "label": sample.label, "index": index, "flip": flip}
