"""``ceprompt check-data``: every problem of a dataset at once, with a summary.

Errors (the run would refuse the data): index files missing or malformed, duplicate ids with
their line numbers, labels out of range, ids present in one file and not another, images
missing or unreadable. Warnings (the run goes on): images that are not RGB (converted when
loaded), very small images, far-from-square images (squashed by the resize), empty classes.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .datasets import index_dataset, scan_images
from .three_files import Problems

SMALL_SIDE = 32  # pixels
MAX_ASPECT = 1.25


@dataclass
class DataReport:
    dataset: str
    root: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images indexed
    errors: list[str]
    warnings: list[str]
    modes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> images, the most common ones

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}

    def format(self, max_lines: int = 50) -> str:
        lines = [f"{self.dataset} at {self.root}: {len(self.class_names)} classes"]
        for split, counts in self.counts.items():
            lines.append(f"  {split:5s} {sum(counts.values()):7d} images  " +
                         ", ".join(f"{c} {n}" for c, n in counts.items()))
        if self.modes:
            lines.append("  modes: " + ", ".join(f"{m} {n}" for m, n in self.modes.items()))
        if self.sizes:
            lines.append("  sizes: " + ", ".join(f"{s} {n}" for s, n in self.sizes.items()))
        for title, items in (("errors", self.errors), ("warnings", self.warnings)):
            lines.append(f"{len(items)} {title}" + (":" if items else ""))
            lines += [f"  {item}" for item in items[:max_lines]]
            if len(items) > max_lines:
                lines.append(f"  ... and {len(items) - max_lines} more")
        return "\n".join(lines)


def check_data(dataset: str, root: str | os.PathLike, image_dir: str | None = None,
               classes: Sequence[str] | None = None, full: bool = False, workers: int = 8,
               allow_outside_root: bool = False) -> DataReport:
    problems = Problems()
    splits = index_dataset(dataset, root, image_dir, classes, problems, allow_outside_root)
    errors, warnings = list(problems.items), []
    samples = splits.train + splits.test
    infos = scan_images(samples, full=full, workers=workers)
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    small, oblong = [], []
    for sample, info in zip(samples, infos):
        if info.problem:
            errors.append(f"{sample.path}: {info.problem}")
            continue
        modes[info.mode] += 1
        w, h = info.size
        sizes[f"{w}x{h}"] += 1
        if min(w, h) < SMALL_SIDE:
            small.append(sample.path)
        if max(w, h) > MAX_ASPECT * min(w, h):
            oblong.append(sample.path)
    for mode, n in modes.items():
        if mode != "RGB":
            warnings.append(f"{n} image(s) in mode {mode}, converted to RGB when loaded")
    if small:
        warnings.append(f"{len(small)} image(s) smaller than {SMALL_SIDE} px on a side, e.g. {small[0]}")
    if oblong:
        warnings.append(f"{len(oblong)} image(s) more than {MAX_ASPECT}:1 from square (squashed by the "
                        f"resize), e.g. {oblong[0]}")
    counts = {}
    for split, items in (("train", splits.train), ("test", splits.test)):
        per = Counter(s.label for s in items)
        counts[split] = {name: per.get(i, 0) for i, name in enumerate(splits.class_names)}
        empty = [name for name, n in counts[split].items() if n == 0]
        if empty and items:
            warnings.append(f"{split} split has no images of {', '.join(empty)}")
    return DataReport(dataset, str(Path(splits.root)), list(splits.class_names), counts, errors, warnings,
                      dict(modes.most_common()), dict(sizes.most_common(5)))
