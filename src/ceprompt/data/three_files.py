"""The dataset index format shared by every loader: three text files, one ``id value`` pair per line.

* ``images.txt``             - id, image path (relative to the dataset's image folder)
* ``image_class_labels.txt`` - id, integer label
* ``train_test_split.txt``   - id, 1 for training or 0 for test

Parsing collects every problem (with file and line number) before failing, so a user fixes a
broken index in one pass instead of one error at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError
from ..core.outputs import INCOMPLETE

IMAGES, LABELS, SPLIT = "images.txt", "image_class_labels.txt", "train_test_split.txt"
MAX_LISTED = 20  # problems printed before "... and N more"


@dataclass
class Problems:
    """Problems found while reading a dataset; raised together as one DataError."""

    items: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.items.append(message)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_LISTED]
        more = len(self.items) - len(shown)
        lines = "\n  ".join(shown + ([f"... and {more} more"] if more else []))
        raise DataError(f"{what}: {len(self.items)} problem(s):\n  {lines}")


@dataclass(frozen=True)
class Record:
    id: str
    path: str
    label: int  # as written in the file (before any offset)
    is_train: bool
    label_line: int = 0  # where the label is in the labels file, for messages


def read_pairs(path: Path, problems: Problems) -> dict[str, tuple[str, int]] | None:
    """``id -> (value, line number)``; malformed and duplicate lines are reported, not kept.
    None when the file is missing or unreadable (also reported)."""
    if not path.is_file():
        problems.add(f"{path}: missing file")
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.add(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return None
    except OSError as exc:
        problems.add(f"{path}: cannot read ({exc.strerror})")
        return None
    pairs: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            problems.add(f"{path}:{number}: expected 'id value', got {line.strip()[:80]!r}")
            continue
        key, value = parts[0], parts[1].strip()
        if key in pairs:
            problems.add(f"{path}:{number}: duplicate id {key!r} (first on line {pairs[key][1]})")
            continue
        pairs[key] = (value, number)
    return pairs


def read_index(folder: Path, names: tuple[str, str, str] = (IMAGES, LABELS, SPLIT),
               problems: Problems | None = None) -> list[Record]:
    """Read and cross-check the three files in ``folder``; raises DataError listing every problem
    unless a ``problems`` collector is passed (then the caller decides)."""
    if (folder / INCOMPLETE).exists():
        raise DataError(f"{folder}: its index files are incomplete: `ceprompt prepare` was interrupted while it "
                        "replaced them; run the same prepare command again")
    own = problems is None
    problems = problems if problems is not None else Problems()
    tables = {name: read_pairs(folder / name, problems) for name in names}
    readable = {name: t for name, t in tables.items() if t is not None}
    for name, table in readable.items():
        others = [n for n in readable if n != name]
        for key, (_, number) in table.items():
            absent = [n for n in others if key not in readable[n]]
            if absent:
                problems.add(f"{folder / name}:{number}: id {key!r} is missing from {' and '.join(absent)}")
    records: list[Record] = []
    if len(readable) == 3:
        images, labels, split = (readable[n] for n in names)
        for key, (rel, _) in images.items():
            if key not in labels or key not in split:
                continue
            label_text, label_line = labels[key]
            split_text, split_line = split[key]
            try:
                label = int(label_text)
            except ValueError:
                problems.add(f"{folder / names[1]}:{label_line}: label {label_text!r} is not an integer")
                continue
            if split_text not in ("0", "1"):
                problems.add(f"{folder / names[2]}:{split_line}: split {split_text!r} must be 1 (train) or 0 (test)")
                continue
            records.append(Record(id=key, path=rel, label=label, is_train=split_text == "1", label_line=label_line))
    if own:
        problems.raise_if_any(f"dataset index in {folder}")
    return records
