"""``predict`` on one video: a row per face per sampled frame with its time, track and smoothed result; the
annotated video (track ids and smoothed labels drawn on every frame), the per-track summary and the timeline."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from ..api import Recognizer
from ..core.errors import CepromptError
from ..core.outputs import PictureFolder
from ..core.paths import file_stem
from ..video.decode import Frame
from ..video.encode import AnnotatedVideo
from ..video.summary import VideoSummary, plot_timeline
from ..video.tracking import TrackedFace
from .drawing import annotate_tracked
from .predict_plan import VideoOptions
from .rows import Record, error_row, record


def predict_video(rec: Recognizer, index: int, path: Path, options: VideoOptions, detect: str, batch_size: int,
                  annotate: PictureFolder | None = None, timeline: PictureFolder | None = None,
                  summary_out: Callable[[Record], object] | None = None) -> Iterator[Record]:
    """The video's rows; a failure part-way (a corrupt stream, an encoder error) is one error row after the rows of
    the frames before it, and the annotated video keeps those frames. ``summary_out`` receives the video's
    per-track summary rows; ``timeline`` gets its timeline picture."""
    stem = f"{index:05d}_{file_stem(path.stem)}"
    keep = VideoSummary(rec.class_names, keep_timeline=timeline is not None) \
        if summary_out is not None or timeline is not None else None
    any_face, failed = False, False
    with contextlib.ExitStack() as stack:
        writer = None
        latest: list[TrackedFace] = []
        try:
            for frame, found in rec.video_frames(path, options.stride, options.fps, options.smooth, options.memory,
                                                 detect, batch_size, every_frame=annotate is not None):
                if found is not None:
                    latest = found.faces
                    any_face = any_face or bool(latest)
                    for j, tracked in enumerate(latest):
                        yield record(str(path), tracked.face, frame=frame.index, time=frame.time, track=tracked.track,
                                     face=j, smoothed=tracked.smoothed)
                    if keep is not None:
                        keep.add(found)
                if annotate is not None and frame.image is not None:
                    if writer is None:
                        writer = stack.enter_context(_annotated(annotate, f"{stem}{path.suffix.lower()}", frame))
                    writer.write(annotate_tracked(frame.image, latest, rec.class_names), frame.time)
        except CepromptError as exc:
            failed = True
            yield error_row(path, exc)
        except OSError as exc:  # the annotated video could not be written
            failed = True
            yield error_row(path, CepromptError(f"cannot write the annotated video ({exc.strerror or exc})"))
    if not any_face and not failed:
        yield record(str(path))  # like an image without faces: one empty row
    if keep is not None and summary_out is not None:
        for row in keep.rows():
            summary_out({"path": str(path), **row})
    if keep is not None and timeline is not None:
        tracks = len(keep.tracks)
        title = f"{path.name}: {tracks} track{'s' if tracks != 1 else ''}, smoothed expression over time"
        timeline.save_file(f"{stem}.png", lambda tmp: plot_timeline(keep, title, tmp))


@contextlib.contextmanager
def _annotated(folder: PictureFolder, name: str, first: Frame) -> Iterator[AnnotatedVideo]:
    """The annotated video, written beside its name in the folder and renamed once every frame is in."""
    with folder.writing(name) as tmp:
        video = AnnotatedVideo(tmp, Path(name).suffix, first.rate)
        try:
            yield video
        finally:
            video.close()
