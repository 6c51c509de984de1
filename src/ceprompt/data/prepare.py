"""``ceprompt prepare``: official dataset distributions -> the three-file index ceprompt reads.

* RAF-DB: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``, labels 1..7) and
  ``Image/aligned/`` (or, with ``--align``, faces re-cut from ``Image/original/`` into
  ``Image/aligned_224/`` by :func:`ceprompt.data.faces.align_face`).
* AffectNet: ``training.csv`` and ``validation.csv`` (the test set) with
  ``subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks, expression, ...``;
  images under ``Manually_Annotated_Images/``. Writes the 7-class (expressions 0-6) and the 8-class
  (0-7, with contempt) index; none/uncertain/no-face rows (8-10) are left out.
* FERPlus: ``fer2013new.csv`` (``Usage, Image name`` and 10 vote counts) with the images in
  ``FER2013Train/``, ``FER2013Valid/``, ``FER2013Test/``. Majority vote: a face is kept when its most
  voted class has more than half of the votes and is one of the 8 emotions (not unknown / not a face).
  Training -> train, PrivateTest -> test, PublicTest as ``--valid`` says (skipped by default).

Malformed rows are reported with their line numbers; ``--skip-bad-rows`` leaves them out instead.
Images stay where they are (DST links to SRC's image folders) unless ``--align`` writes new crops.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from tqdm import tqdm

from ..core.errors import ConfigError, DataError
from ..core.io_utils import atomic_write, atomic_write_set
from ..core.outputs import INCOMPLETE
from ..core.paths import confined, escapes
from .datasets import LAYOUTS
from .three_files import Problems

log = logging.getLogger(__name__)
ALIGN_SIZE = 224
FERPLUS_FOLDERS = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}


@dataclass
class Entry:
    path: str  # relative to the image folder the dataset layout reads from
    label: int  # as the layout's files expect (RAF-DB 1..7, others 0-based)
    train: bool
    source: Path | None = None  # image to re-align, for --align
    box: tuple[float, float, float, float] | None = None  # annotated face box, fallback when MTCNN finds none


@dataclass
class Prepared:
    entries: list[Entry]
    skipped_rows: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> count (not errors: the protocol)


def _finish(problems: Problems, skip_bad_rows: bool, what: str) -> list[str]:
    if problems and not skip_bad_rows:
        problems.raise_if_any(f"{what} (pass --skip-bad-rows to leave malformed rows out)")
    return list(problems.items)


def read_rafdb(src: Path, skip_bad_rows: bool) -> Prepared:
    listing = src / "EmoLabel" / "list_patition_label.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: missing (the RAF-DB basic label list)")
    problems, entries, seen = Problems(), [], {}
    for number, line in enumerate(listing.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{listing}:{number}"
        if len(parts) != 2:
            problems.add(f"{where}: expected 'name label', got {line.strip()[:60]!r}")
            continue
        name, label = parts
        if not label.isdigit() or not 1 <= int(label) <= 7:
            problems.add(f"{where}: label {label!r} is not 1..7")
            continue
        if not name.startswith(("train_", "test_")):
            problems.add(f"{where}: name {name!r} does not start with train_ or test_")
            continue
        if "/" in name or "\\" in name:
            problems.add(f"{where}: name {name!r} is a path; expected a file name")
            continue
        if name in seen:
            problems.add(f"{where}: {name} already listed on line {seen[name]}")
            continue
        seen[name] = number
        stem = name.rsplit(".", 1)[0]
        entries.append(Entry(f"{stem}_aligned.jpg", int(label), name.startswith("train_"),
                             source=src / "Image" / "original" / name))
    return Prepared(entries, _finish(problems, skip_bad_rows, str(listing)))


def _read_csv(path: Path, required: Sequence[str], problems: Problems) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    with open(path, newline="", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or any(col not in header for col in required):
            raise DataError(f"{path}: header {header} lacks {[c for c in required if c not in (header or [])]}")
        rows = []
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                problems.add(f"{path}:{number}: {len(values)} fields, expected {len(header)}")
                continue
            rows.append((number, dict(zip(header, values))))
    return rows


def read_affectnet(src: Path, skip_bad_rows: bool, n_classes: int) -> Prepared:
    problems, entries, left_out = Problems(), [], {}
    cols = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"]
    for name, train in (("training.csv", True), ("validation.csv", False)):
        path = src / name
        for number, row in _read_csv(path, cols, problems):
            where = f"{path}:{number}"
            try:
                expression = int(row["expression"])
                x, y, w, h = (float(row[k]) for k in ("face_x", "face_y", "face_width", "face_height"))
            except ValueError:
                problems.add(f"{where}: expression or face box is not a number")
                continue
            rel = row["subDirectory_filePath"].strip()
            if not rel:
                problems.add(f"{where}: empty subDirectory_filePath")
                continue
            if escapes(rel):
                problems.add(f"{where}: subDirectory_filePath {rel!r} leaves the image folder")
                continue
            if not 0 <= expression <= 10:
                problems.add(f"{where}: expression {expression} outside 0..10")
                continue
            if expression >= n_classes:
                reason = {7: "contempt (8-class only)", 8: "none", 9: "uncertain", 10: "no face"}[expression]
                left_out[reason] = left_out.get(reason, 0) + 1
                continue
            image = f"Manually_Annotated_Images/{rel}"
            entries.append(Entry(image, expression, train, source=src / image, box=(x, y, x + w, y + h)))
    return Prepared(entries, _finish(problems, skip_bad_rows, f"AffectNet in {src}"), left_out)


def read_ferplus(src: Path, skip_bad_rows: bool, valid_as: str) -> Prepared:
    problems, entries, left_out = Problems(), [], {}
    path = src / "fer2013new.csv"
    emotions = list(LAYOUTS["ferplus"].class_names)
    vote_cols = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]
    for number, row in _read_csv(path, ["Usage", "Image name", *vote_cols], problems):
        where = f"{path}:{number}"
        usage, name = row["Usage"].strip(), row["Image name"].strip()
        if usage not in FERPLUS_FOLDERS:
            problems.add(f"{where}: Usage {usage!r} is not Training, PublicTest or PrivateTest")
            continue
        if not name:
            left_out["no image (removed by FERPlus)"] = left_out.get("no image (removed by FERPlus)", 0) + 1
            continue
        if "/" in name or "\\" in name or name in (".", ".."):
            problems.add(f"{where}: Image name {name!r} is a path; expected a file name")
            continue
        try:
            votes = [int(row[c]) for c in vote_cols]
        except ValueError:
            problems.add(f"{where}: vote counts are not integers")
            continue
        total, top = sum(votes), max(votes)
        best = votes.index(top)
        if total == 0 or top * 2 <= total or best >= len(emotions):
            reason = "no majority" if total == 0 or top * 2 <= total else "unknown / not a face"
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        if usage == "PublicTest" and valid_as == "skip":
            left_out["PublicTest (--valid skip)"] = left_out.get("PublicTest (--valid skip)", 0) + 1
            continue
        train = usage == "Training" or (usage == "PublicTest" and valid_as == "train")
        entries.append(Entry(f"{FERPLUS_FOLDERS[usage]}/{name}", best, train))
    return Prepared(entries, _finish(problems, skip_bad_rows, str(path)), left_out)


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` show ``src``'s folder (a symlink) unless they are the same place."""
    if not src.exists():
        raise DataError(f"{src}: image folder not found")
    if dst.resolve() == src.resolve():
        return
    if dst.exists() or dst.is_symlink():
        raise ConfigError(f"{dst}: already exists; remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst, target_is_directory=True)


def _align_all(entries: list[Entry], image_root: Path, device: str, progress: bool,
               overwrite: bool = False) -> list[str]:
    """Re-cut every face with MTCNN + align_face; falls back to the annotated box, then reports. A crop already
    there is kept only when it decodes in full (a run killed mid-way may have left a truncated one) and
    ``overwrite`` is off; each crop is written to a temporary file and renamed."""
    from .faces import FaceDetector, align_face
    from .images import open_image, probe_image

    detector = FaceDetector(device)
    notes = []
    for entry in tqdm(entries, disable=not progress, desc="aligning faces", unit="img"):
        out = confined(image_root, entry.path, "image path")
        if out.exists() and not overwrite and probe_image(out, full=True).problem is None:
            continue
        image = open_image(entry.source)
        faces = detector.detect(image)
        if faces:
            face = faces[0]
            crop = align_face(image, face.box, face.landmarks, ALIGN_SIZE)
        elif entry.box is not None:
            crop = align_face(image, entry.box, None, ALIGN_SIZE)
            notes.append(f"{entry.source}: no face detected; cut at the annotated box")
        else:
            crop = image.resize((ALIGN_SIZE, ALIGN_SIZE))
            notes.append(f"{entry.source}: no face detected; whole image resized")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as tmp:
            crop.save(tmp, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"), quality=95)
    return notes


def _check_index_targets(folder: Path, names: Sequence[str], overwrite: bool) -> None:
    existing = [str(folder / n) for n in names if (folder / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: already exists; pass --overwrite to replace the index files")


def _write_index(folder: Path, names: Sequence[str], entries: list[Entry], overwrite: bool) -> None:
    _check_index_targets(folder, names, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    columns = ([f"{i} {e.path}" for i, e in enumerate(entries, 1)], [f"{i} {e.label}" for i, e in enumerate(entries, 1)],
               [f"{i} {int(e.train)}" for i, e in enumerate(entries, 1)])
    # The three files are one index (ids in one, labels of those ids in the next): replaced as a set, with a
    # marker that readers refuse while the set may be half replaced (a kill between two renames).
    marker = folder / INCOMPLETE
    marker.write_text("ceprompt prepare was replacing this folder's index files and did not finish; run it again\n")
    files = [folder / name for name in names]
    with atomic_write_set(files, commit=files[0]) as tmp:
        for path, lines in zip(files, columns):
            tmp[path].write_text("\n".join(lines) + "\n")
    marker.unlink()


def prepare(dataset: str, src: str | os.PathLike, dst: str | os.PathLike, align: bool = False,
            skip_bad_rows: bool = False, overwrite: bool = False, valid_as: str = "skip", device: str = "cpu",
            progress: bool = True) -> dict[str, object]:
    """Convert ``src`` into ceprompt's layout under ``dst``; returns a summary (counts, skipped rows)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise DataError(f"{src}: dataset folder not found")
    readers: dict[str, Callable[[], Prepared]] = {
        "rafdb": lambda: read_rafdb(src, skip_bad_rows),
        "affectnet": lambda: read_affectnet(src, skip_bad_rows, 8),
        "ferplus": lambda: read_ferplus(src, skip_bad_rows, valid_as),
    }
    if dataset not in readers:
        raise ConfigError(f"prepare {dataset!r}: expected one of {list(readers)}")
    if dataset == "ferplus" and align:
        raise ConfigError("FERPlus images are already 48x48 face crops; --align does not apply")
    if valid_as not in ("skip", "train", "test"):
        raise ConfigError(f"--valid {valid_as!r}: expected skip, train or test")
    index_files = {"rafdb": [(dst / "EmoLabel", LAYOUTS["rafdb"].files)],
                   "affectnet": [(dst / "affectnet_info", LAYOUTS["affectnet7"].files),
                                 (dst / "affectnet_info", LAYOUTS["affectnet8"].files)],
                   "ferplus": [(dst / "ferplus_info", LAYOUTS["ferplus"].files)]}[dataset]
    for folder, names in index_files:  # before any face is aligned or any link made
        _check_index_targets(folder, names, overwrite)
    prepared = readers[dataset]()
    notes: list[str] = []
    if dataset == "rafdb":
        if align:  # same file names, under Image/aligned_224/
            notes = _align_all(prepared.entries, dst / "Image" / "aligned_224", device, progress, overwrite)
        else:
            _link(src / "Image" / "aligned", dst / "Image" / "aligned")
        _write_index(dst / "EmoLabel", LAYOUTS["rafdb"].files, prepared.entries, overwrite)
    elif dataset == "affectnet":
        if align:
            for e in prepared.entries:
                e.path = "aligned_224/" + e.path.split("/", 1)[1]
            notes = _align_all(prepared.entries, dst, device, progress, overwrite)
        else:
            _link(src / "Manually_Annotated_Images", dst / "Manually_Annotated_Images")
        seven = [e for e in prepared.entries if e.label < 7]
        _write_index(dst / "affectnet_info", LAYOUTS["affectnet7"].files, seven, overwrite)
        _write_index(dst / "affectnet_info", LAYOUTS["affectnet8"].files, prepared.entries, overwrite)
    else:
        for folder in sorted({e.path.split("/", 1)[0] for e in prepared.entries}):
            _link(src / folder, dst / folder)
        _write_index(dst / "ferplus_info", LAYOUTS["ferplus"].files, prepared.entries, overwrite)
    summary = {
        "dataset": dataset, "destination": str(dst), "train": sum(e.train for e in prepared.entries),
        "test": sum(not e.train for e in prepared.entries), "skipped_rows": prepared.skipped_rows,
        "left_out": prepared.left_out, "alignment_notes": notes,
    }
    return summary
