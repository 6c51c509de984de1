"""``predict``'s rows: one record per face (or per file without faces, or per error), written as CSV or JSON lines.

Columns: ``path, frame, time, track, face`` (frame, time in seconds and track id for videos), the box ``x0, y0, x1,
y1``, the frame's own result ``label, score, prob_<class>...``, for videos the result smoothed along the track
``smoothed_label, smoothed_score, smoothed_prob_<class>...``, then ``detector_confidence, error``. JSON lines carry
the same keys (and the face's landmarks); CSV cells that start like a formula get a leading ``'``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import IO, Any, Sequence

from ..core.errors import CepromptError
from ..core.io_utils import spreadsheet_safe

log = logging.getLogger("ceprompt.verbs.predict")

Record = dict[str, Any]


def columns(class_names: Sequence[str]) -> list[str]:
    return ["path", "frame", "time", "track", "face", "x0", "y0", "x1", "y1", "label", "score",
            *[f"prob_{c}" for c in class_names], "smoothed_label", "smoothed_score",
            *[f"smoothed_prob_{c}" for c in class_names], "detector_confidence", "error"]


def record(path: str, result: Any = None, *, frame: int | None = None, time: float | None = None,
           track: int | None = None, face: int | None = None, smoothed: dict[str, float] | None = None,
           error: str = "") -> Record:
    """One row: ``result`` a :class:`~ceprompt.api.FaceResult` (None: a file without faces, or an error)."""
    row: Record = {"path": path, "frame": frame, "time": None if time is None else round(time, 4), "track": track,
                   "face": face}
    if result is not None:
        row.update(zip(("x0", "y0", "x1", "y1"), result.box))
        row.update(label=result.label, score=round(result.score, 6))
        row.update({f"prob_{c}": round(v, 6) for c, v in result.probabilities.items()})
    if smoothed is not None:
        label = max(smoothed, key=smoothed.__getitem__)
        row.update(smoothed_label=label, smoothed_score=round(smoothed[label], 6))
        row.update({f"smoothed_prob_{c}": round(v, 6) for c, v in smoothed.items()})
    if result is not None:
        confidence = result.detector_confidence
        row["detector_confidence"] = None if confidence is None else round(confidence, 6)
        row["landmarks"] = result.landmarks
    row["error"] = error
    return row


def error_row(path: Path, exc: CepromptError) -> Record:
    """The row of a file that failed (logged once): its error without the path the row already names."""
    message = str(exc).removeprefix(f"{path}: ")
    log.warning("%s", str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
    return record(str(path), error=message)


class Writer:
    """CSV (a header, then the columns) or JSON lines (each record as it is)."""

    def __init__(self, fh: IO[str], fmt: str, class_names: Sequence[str]) -> None:
        self.fh, self.fmt = fh, fmt
        self.columns = columns(class_names)
        self.csv = csv.writer(fh) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow([spreadsheet_safe(c) for c in self.columns])

    def write(self, row: Record) -> None:
        if self.csv:
            self.csv.writerow(["" if row.get(c) is None else spreadsheet_safe(row[c]) for c in self.columns])
        else:
            self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.fh.flush()


def summary_columns(class_names: Sequence[str]) -> list[str]:
    return ["path", "track", "first_time", "last_time", "duration", "samples", "dominant",
            *[f"share_{c}" for c in class_names], *[f"mean_prob_{c}" for c in class_names]]


def write_summary(rows: Sequence[Record], class_names: Sequence[str], fh: IO[str], fmt: str) -> None:
    """``--summary``: CSV, or JSON (a list of the rows) when the file ends in .json."""
    if fmt == "json":
        fh.write(json.dumps(list(rows), indent=1) + "\n")
        return
    writer = csv.writer(fh)
    names = summary_columns(class_names)
    writer.writerow([spreadsheet_safe(c) for c in names])
    for row in rows:
        writer.writerow(["" if row.get(c) is None else spreadsheet_safe(row[c]) for c in names])
