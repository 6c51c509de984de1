"""What a ``predict`` run reads and writes, checked before the model (or torch) is loaded: the inputs, the outputs
under the one output policy, the video settings, and the optional packages the inputs need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.errors import ConfigError
from ..core.extras import DETECTORS, require
from ..core.outputs import OutputFile, PictureFolder, distinct_outputs
from ..core.ranges import check
from ..data.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from ..video.decode import check_sampling
from ..video.tracking import DEFAULT_MEMORY, DEFAULT_SMOOTH, MEMORY, SMOOTH

DEFAULT_STRIDE = 5


@dataclass(frozen=True)
class VideoOptions:
    stride: int | None  # every N-th frame (default 5 when fps is not given)
    fps: float | None  # or F frames per second, whatever the source rate
    smooth: float  # seconds, the time constant of the smoothing along each track (0: off)
    memory: float  # seconds a lost face keeps its track id

    @classmethod
    def checked(cls, stride: int | None = None, fps: float | None = None, smooth: float | None = None,
                memory: float | None = None) -> "VideoOptions":
        stride, fps = check_sampling(stride if stride is not None or fps is not None else DEFAULT_STRIDE, fps)
        return cls(stride, fps, float(check("--smooth", DEFAULT_SMOOTH if smooth is None else smooth, SMOOTH)),
                   float(check("--track-memory", DEFAULT_MEMORY if memory is None else memory, MEMORY)))


def expand_inputs(paths: Sequence[str], suffixes: frozenset[str] = IMAGE_SUFFIXES | VIDEO_SUFFIXES
                  ) -> list[Path]:
    """Files as given (any suffix: unsupported ones become error rows) and, searched recursively, the files of
    folders that have one of ``suffixes``."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        try:
            folder = p.is_dir()
        except OSError:  # a name too long for the file system: that input's own error row, later
            folder = False
        if folder:
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes))
        else:
            out.append(p)
    return out


@dataclass
class PredictPlan:
    """Inputs and outputs of a predict run, all checked before the model is loaded."""

    files: list[Path]
    output: OutputFile | None  # None: stdout
    fmt: str
    annotate: PictureFolder | None
    explain: PictureFolder | None
    video: VideoOptions
    summary: OutputFile | None = None
    timeline: PictureFolder | None = None

    def folders(self) -> list[PictureFolder]:
        return [f for f in (self.annotate, self.explain, self.timeline) if f is not None]


def plan_predict(inputs: Sequence[str], output: str = "-", fmt: str | None = None, annotate_dir: str | None = None,
                 explain_dir: str | None = None, video_stride: int | None = None, overwrite: bool = False,
                 fps: float | None = None, smooth: float | None = None, track_memory: float | None = None,
                 summary: str | None = None, timeline_dir: str | None = None) -> PredictPlan:
    video = VideoOptions.checked(video_stride, fps, smooth, track_memory)
    fmt = fmt or ("jsonl" if output.endswith((".jsonl", ".json")) else "csv")
    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"--format {fmt!r}: expected csv or jsonl")
    distinct_outputs(("--output", output), ("--summary", summary))
    files = expand_inputs(inputs)
    if not files:
        raise ConfigError(f"no images or videos found in {list(inputs)}")
    out = None if output == "-" else OutputFile(output, overwrite, "--output")
    # pictures are named after the inputs: a folder with files in it could hold an earlier run's, which this run
    # would replace one by one
    folders = [PictureFolder(path, option, overwrite) if path else None
               for path, option in ((annotate_dir, "--annotate"), (explain_dir, "--explain"),
                                    (timeline_dir, "--timeline"))]
    return PredictPlan(files, out, fmt, folders[0], folders[1], video,
                       OutputFile(summary, overwrite, "--summary") if summary else None, folders[2])


# What each kind of input needs beyond ceprompt itself: (import name, extra) pairs, checked before any work.
VIDEO = (("av", "video"), ("trackers", "video"))


def check_extras(plan: PredictPlan, detect: str) -> None:
    """The optional packages the inputs need, installed: said once, before the model loads, not once per file."""
    suffixes = {path.suffix.lower() for path in plan.files}
    needed = list(VIDEO) if suffixes & VIDEO_SUFFIXES else []
    if suffixes & (IMAGE_SUFFIXES | VIDEO_SUFFIXES):
        needed += DETECTORS[detect]
    require(needed, "predicting these inputs")
