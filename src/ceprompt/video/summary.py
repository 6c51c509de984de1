"""Per video and track: when the person was seen, how their expression was distributed, and a timeline picture.

A track's summary counts its samples (the frames it was classified in): the share of a class is the share of the
track's samples whose smoothed label is that class (samples are evenly spaced in time with ``--fps``, and with
``--video-stride`` on a constant-rate video), the dominant expression is the class with the largest share, and the
mean probabilities average the frames' own (raw) probabilities. The timeline keeps each track's smoothed
probabilities over time; its memory grows with the samples (a few bytes per class each: a three-hour video sampled
five times a second holds 54,000 samples per track).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.outputs import save_figure
from .tracking import FrameRecord


@dataclass
class TrackSummary:
    track: int
    first_time: float
    last_time: float
    samples: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    probability_sums: np.ndarray | None = None

    def row(self, class_names: Sequence[str]) -> dict[str, Any]:
        shares = {c: self.label_counts.get(c, 0) / self.samples for c in class_names}
        means = self.probability_sums / self.samples
        return {"track": self.track, "first_time": round(self.first_time, 3), "last_time": round(self.last_time, 3),
                "duration": round(self.last_time - self.first_time, 3), "samples": self.samples,
                "dominant": max(class_names, key=shares.__getitem__),
                **{f"share_{c}": round(shares[c], 6) for c in class_names},
                **{f"mean_prob_{c}": round(float(m), 6) for c, m in zip(class_names, means)}}


class VideoSummary:
    """Accumulates the tracked faces of one video (constant memory per track, plus its timeline when kept)."""

    def __init__(self, class_names: Sequence[str], keep_timeline: bool = False) -> None:
        self.class_names = list(class_names)
        self.tracks: dict[int, TrackSummary] = {}
        self.timeline: dict[int, tuple[list[float], list[np.ndarray]]] | None = {} if keep_timeline else None
        self.duration = 0.0

    def add(self, record: FrameRecord) -> None:
        self.duration = max(self.duration, record.time)
        for tracked in record.faces:
            summary = self.tracks.get(tracked.track)
            if summary is None:
                summary = self.tracks[tracked.track] = TrackSummary(tracked.track, record.time, record.time,
                                                                    probability_sums=np.zeros(len(self.class_names)))
            summary.last_time = record.time
            summary.samples += 1
            label = tracked.smoothed_label
            summary.label_counts[label] = summary.label_counts.get(label, 0) + 1
            summary.probability_sums += [tracked.face.probabilities[c] for c in self.class_names]
            if self.timeline is not None:
                times, values = self.timeline.setdefault(tracked.track, ([], []))
                times.append(record.time)
                values.append(np.array([tracked.smoothed[c] for c in self.class_names], dtype=np.float32))

    def rows(self) -> list[dict[str, Any]]:
        return [self.tracks[t].row(self.class_names) for t in sorted(self.tracks)]


MAX_TIMELINE_TRACKS = 10  # rows in one picture; longer-lived tracks are drawn first


def plot_timeline(summary: VideoSummary, title: str, path: Path) -> Path:
    """One row per track (up to :data:`MAX_TIMELINE_TRACKS`, the longest-seen first, in order of appearance):
    the smoothed probability of every class over time, stacked, a colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = summary.timeline or {}
    chosen = sorted(timeline, key=lambda t: -summary.tracks[t].samples)[:MAX_TIMELINE_TRACKS]
    chosen.sort(key=lambda t: summary.tracks[t].first_time)
    rows = max(1, len(chosen))
    colours = matplotlib.colormaps["tab10"].colors
    height = 1.25 + 1.0 * rows  # inches: 0.75 for the title and legend on top, 0.5 for the time axis
    fig, axes = plt.subplots(rows, 1, figsize=(10, height), sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.09, right=0.93, top=1 - 0.75 / height, bottom=0.5 / height, hspace=0.25)
    end = max(summary.duration, 1e-3)
    for ax, track in zip(axes[:, 0], chosen):
        times, values = timeline[track]
        t = np.asarray(times)
        v = np.stack(values).T
        # a gap longer than the samples' usual spacing (the face was not seen) is left blank
        spacing = np.median(np.diff(t)) if len(t) > 1 else end
        breaks = np.flatnonzero(np.diff(t) > 3 * spacing) + 1
        for part_t, part_v in zip(np.split(t, breaks), np.split(v, breaks, axis=1)):
            if len(part_t) == 1:  # one sample: a short bar of its own width
                part_t = np.array([part_t[0], part_t[0] + spacing])
                part_v = np.repeat(part_v, 2, axis=1)
            ax.stackplot(part_t, part_v, colors=colours[: len(summary.class_names)], linewidth=0)
        s = summary.tracks[track]
        ax.set_ylabel(f"track {track}", rotation=0, ha="right", va="center", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_xlim(0, end)
        ax.text(1.01, 0.5, s.row(summary.class_names)["dominant"], transform=ax.transAxes, fontsize=8, va="center")
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_yticks([])
    axes[-1, 0].set_xlabel("time (s)")
    handles = [matplotlib.patches.Patch(color=colours[i % len(colours)], label=c)
               for i, c in enumerate(summary.class_names)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.09, 1 - 0.32 / height), ncol=min(len(handles), 8),
               fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.2)
    hidden = len(timeline) - len(chosen)
    fig.text(0.09, 1 - 0.08 / height, title + (f"  ({hidden} shorter tracks not shown)" if hidden else ""),
             fontsize=10, va="top", ha="left")
    return save_figure(fig, path, 100)
