"""Faces followed over time: a track id per person, and expressions smoothed along each track.

Identity from sample to sample comes from ByteTrack (Roboflow's maintained ``trackers`` library, installed with the
``video`` extra): each detected face box is matched to the tracks' Kalman-predicted boxes by IoU, using the frames'
own timestamps. A face hidden or missed by the detector keeps its id while it is remembered (``memory`` seconds, 3
by default): long enough for a head turned away, a hand before the face or a person passing behind another; a face
gone for longer gets a new id when it returns.

Finding a lost face again is ceprompt's own, not ByteTrack's: matched against a lost track's prediction, a face
that was partly hidden before it disappeared was missed (its shrinking box throws the prediction off), and someone
new appearing near the lost face's path took its id. So ByteTrack forgets a track it misses, and when it starts a
new one ceprompt first looks among the faces lost within ``memory`` seconds for one that could have moved there.
Continuing at its velocity (its steps between sightings averaged over half a second: from the last two sightings
alone, a few pixels of detector jitter turned the direction) the lost face would be at a predicted point; the new
face must lie within an ellipse around it: across the direction of motion 0.75 face sizes plus 0.25 per second of
absence, along it that plus half the distance the face was travelling (its speed may have changed more than its
direction). A face standing still gets a circle of the smaller size; a face seen once, a circle of one face size
plus 0.75 per second of absence around where it was. A circle large enough for the hidden face's change of speed
would take in someone new beside its path. When the model's own face embedding is given, the most similar such
face is taken; one assignment decides for all new tracks of a frame. The face keeps its id. Faces that look alike
(twins, the test videos' one photo) are then told apart by where they were going.

ByteTrack confirms a new track on its second sighting; ceprompt gives every face its id on its first sighting (ids
1, 2, 3 ... in order of appearance) and keeps it when the library confirms the track.

Smoothing: per track, an exponential moving average of the class probabilities with time constant ``smooth``
seconds: after ``dt`` seconds, ``s <- s + (1 - exp(-dt / smooth)) * (p - s)``; the first sighting starts at ``p``
and 0 turns smoothing off. It depends on time, not on the number of frames, so it means the same at any frame rate
or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..core.errors import CepromptError, ConfigError
from ..core.ranges import Range, check

DEFAULT_SMOOTH = 0.5  # seconds: expression changes in conversation take about 0.5-4 s; frame-to-frame noise is
#   averaged over half a second, and a new expression dominates within a second
DEFAULT_MEMORY = 3.0  # seconds a lost face keeps its id
SMOOTH = Range(0, 3600)
MEMORY = Range(0, 3600, lo_open=True)
VELOCITY_TIME = 0.5  # seconds: a face's velocity is averaged over about this long


@dataclass
class TrackedFace:
    """One face in one frame: its track, the model's result for this frame and the smoothed one."""

    track: int
    face: Any  # the frame's own result (ceprompt.api.FaceResult): box, landmarks, label, score, probabilities
    smoothed: dict[str, float]  # probabilities smoothed along the track

    @property
    def smoothed_label(self) -> str:
        return max(self.smoothed, key=self.smoothed.__getitem__)

    @property
    def smoothed_score(self) -> float:
        return self.smoothed[self.smoothed_label]

    def to_dict(self) -> dict[str, Any]:
        return {"track": self.track, **self.face.to_dict(), "smoothed_label": self.smoothed_label,
                "smoothed_score": self.smoothed_score, "smoothed_probabilities": dict(self.smoothed)}


@dataclass
class FrameRecord:
    """The faces of one video frame (or one frame a caller gave a tracker)."""

    time: float  # seconds
    faces: list[TrackedFace] = field(default_factory=list)  # largest first
    index: int | None = None  # the frame's position in its video


def _tracker_library() -> Any:
    try:
        import supervision
        import trackers
    except ImportError:
        raise CepromptError("following faces over time needs the trackers library: pip install 'ceprompt[video]'") \
            from None
    return trackers, supervision


class FaceTracks:
    """Track ids and smoothed probabilities for the faces of successive frames (times must not go back)."""

    def __init__(self, class_names: Sequence[str], smooth: float = DEFAULT_SMOOTH,
                 memory: float = DEFAULT_MEMORY) -> None:
        self.class_names = list(class_names)
        self.smooth = float(check("smooth", smooth, SMOOTH))
        self.memory = float(check("track memory", memory, MEMORY))
        trackers, self._sv = _tracker_library()
        from trackers.utils.iou import BIoU
        from trackers.utils.state_representations import XCYCSRStateEstimator

        # Every detection ceprompt passes already cleared the face detector's threshold: all of them may start a
        # track and all are ByteTrack's "high confidence" ones. ByteTrack keeps a lost track for one 30 fps frame
        # only (its buffer is in 30 fps frames): matched against its Kalman prediction, grown as below, a lost face
        # took the id of someone new appearing near its path, so a face missed or hidden is found again by ceprompt
        # (see the module), by its averaged velocity and its embedding, for ``memory`` seconds.
        # A face's box is predicted as centre, scale and a fixed aspect ratio (SORT's state): predicting the four
        # corners on their own let a hidden face's box change shape, and miss the face when it came back. Boxes are
        # compared grown by half their size on each side (buffered IoU, C-BIoU): at a few samples per second a face
        # moves most of its width between samples, and plain boxes no longer overlap.
        self._tracker = trackers.ByteTrackTracker(lost_track_buffer=1,
                                                  frame_rate=30.0, track_activation_threshold=0.0,
                                                  minimum_consecutive_frames=1, high_conf_det_threshold=0.0,
                                                  state_estimator_class=XCYCSRStateEstimator,
                                                  iou=BIoU(buffer_ratio=0.5))
        self._ids: dict[int, tuple[Any, int]] = {}  # id(tracklet) -> (tracklet, ceprompt's track id)
        self._retired: set[int] = set()  # tracklets whose face was found again under a new tracklet
        self._next = 1
        self._smoothed: dict[int, tuple[float, np.ndarray]] = {}  # track -> (time, probabilities)
        self._seen: dict[int, _Sighting] = {}  # track -> where and when it was last seen
        self.last_time: float | None = None

    def _new_id(self) -> int:
        self._next += 1
        return self._next - 1

    def _id_of(self, tracklet: Any) -> int:
        if tracklet is None:
            return self._new_id()  # a face that started no track (kept for one frame only)
        key = id(tracklet)
        if key not in self._ids or key in self._retired:
            self._retired.discard(key)
            self._ids[key] = (tracklet, self._new_id())
        return self._ids[key][1]

    def _found_again(self, new: list[tuple[int, Any]], time: float, boxes: np.ndarray,
                     embeddings: Sequence[np.ndarray] | None, taken: set[int]) -> dict[int, int]:
        """Rows of new tracks that are faces lost within ``memory`` seconds (see the module), with their ids: one
        assignment for all of them, the cost the distance moved as a share of what the absence allows, plus (with
        embeddings) one minus the cosine similarity of the faces."""
        from scipy.optimize import linear_sum_assignment

        lost = [(track, seen) for track, seen in self._seen.items()
                if track not in taken and 0 < time - seen.time <= self.memory]
        if not new or not lost:
            return {}
        cost = np.full((len(new), len(lost)), np.inf)
        for i, (row, _) in enumerate(new):
            for j, (_, seen) in enumerate(lost):
                share = _share_of_reach(seen, time, boxes[row])
                if share <= 1.0:
                    cost[i, j] = share
                    if embeddings is not None and seen.embedding is not None:
                        cost[i, j] += 1.0 - float(np.asarray(embeddings[row], dtype=np.float64) @ seen.embedding)
        rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e9))
        found = {}
        for i, j in zip(rows, cols):
            if not np.isfinite(cost[i, j]):
                continue
            row, tracklet = new[i]
            track = lost[j][0]
            for key, (_, owner) in self._ids.items():
                if owner == track:
                    self._retired.add(key)  # its old tracklet, if the library keeps it, no longer stands for it
            if tracklet is not None:
                self._ids[id(tracklet)] = (tracklet, track)
            found[row] = track
        return found

    def update(self, time: float, faces: Sequence[Any], embeddings: Sequence[np.ndarray] | None = None
               ) -> list[TrackedFace]:
        """The tracked faces of the frame at ``time`` seconds, in the order of ``faces`` (``embeddings``: the
        model's unit-length image embedding of each face, used to find a lost face again)."""
        if not math.isfinite(time) or (self.last_time is not None and time < self.last_time):
            raise ConfigError(f"frame time {time}: expected a finite time not before the previous frame's "
                              f"({self.last_time})")
        self.last_time = time
        boxes = np.array([face.box for face in faces], dtype=np.float64).reshape(-1, 4)
        confidence = np.array([1.0 if face.detector_confidence is None else face.detector_confidence
                               for face in faces], dtype=np.float64)
        detections = self._sv.Detections(xyxy=boxes, confidence=confidence,
                                         data={"row": np.arange(len(faces))})
        before = {id(t) for t in self._tracker.tracks}
        out = self._tracker.update(detections, timestamp=time)
        alive = list(self._tracker.tracks)
        spawned = [t for t in alive if id(t) not in before]
        confirmed = {t.tracker_id: t for t in alive if t.tracker_id != -1}
        ids = [0] * len(faces)
        new_rows = []
        for row, library_id in zip(out.data.get("row", []), out.tracker_id):
            row = int(row)
            if library_id != -1:
                ids[row] = self._id_of(confirmed.get(int(library_id)))
            else:
                new_rows.append((row, _closest(spawned, boxes[row])))
        # tracks ByteTrack started: faces it lost, or new ones
        again = self._found_again(new_rows, time, boxes, embeddings, {track for track in ids if track})
        for row, tracklet in new_rows:
            ids[row] = again[row] if row in again else self._id_of(tracklet)
        for row, track in enumerate(ids):
            vector = None if embeddings is None else np.asarray(embeddings[row], dtype=np.float64)
            last, velocity = self._seen.get(track), None
            if last is not None and time > last.time:
                velocity = _velocity(last, time, boxes[row])
            self._seen[track] = _Sighting(time, boxes[row].copy(), vector, velocity)
        kept = {id(t) for t in alive}
        self._ids = {key: value for key, value in self._ids.items() if key in kept}
        self._retired &= kept
        self._seen = {k: v for k, v in self._seen.items() if time - v.time <= self.memory}
        live_ids = {track for _, track in self._ids.values()} | set(ids) | set(self._seen)
        self._smoothed = {k: v for k, v in self._smoothed.items() if k in live_ids}
        return [TrackedFace(track, face, self._smooth(track, time, face)) for track, face in zip(ids, faces)]

    def _smooth(self, track: int, time: float, face: Any) -> dict[str, float]:
        p = np.array([face.probabilities[c] for c in self.class_names], dtype=np.float64)
        previous = self._smoothed.get(track)
        if previous is not None and self.smooth > 0:
            last_time, s = previous
            p = s + (1.0 - math.exp(-(time - last_time) / self.smooth)) * (p - s)
        self._smoothed[track] = (time, p)
        return {c: float(v) for c, v in zip(self.class_names, p)}


@dataclass
class _Sighting:
    time: float
    box: np.ndarray
    embedding: np.ndarray | None
    velocity: np.ndarray | None  # of the box's centre, pixels per second, averaged over time (see _velocity)


def _velocity(last: _Sighting, time: float, box: np.ndarray) -> np.ndarray:
    """The face's velocity after a sighting at ``time``: the step since ``last`` averaged in time with the velocity
    before it (time constant :data:`VELOCITY_TIME`). From two sightings alone, a few pixels of detector jitter
    between samples 0.1-0.3 s apart turned the direction by tens of degrees, and the gate with it."""
    dt = time - last.time
    step = (_centre(box) - _centre(last.box)) / dt
    if last.velocity is None:
        return step
    return last.velocity + (1.0 - math.exp(-dt / VELOCITY_TIME)) * (step - last.velocity)


def _share_of_reach(seen: _Sighting, time: float, box: np.ndarray) -> float:
    """How far ``box`` lies from where the face lost at ``seen`` would be at ``time``, as a share of how far it
    may have gone (1: the edge of the gate; see the module)."""
    size = max(seen.box[2] - seen.box[0], seen.box[3] - seen.box[1], 1.0)
    gap = time - seen.time
    if seen.velocity is None:
        return float(np.hypot(*(_centre(box) - _centre(seen.box)))) / (size * (1.0 + 0.75 * gap))
    offset = _centre(box) - (_centre(seen.box) + seen.velocity * gap)
    speed = float(np.hypot(*seen.velocity))
    across_reach = size * (0.75 + 0.25 * gap)
    if speed < 1e-9:
        return float(np.hypot(*offset)) / across_reach
    along = seen.velocity / speed
    ahead = float(offset @ along)
    across = float(offset[0] * along[1] - offset[1] * along[0])
    return math.hypot(ahead / (across_reach + 0.5 * speed * gap), across / across_reach)


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _closest(candidates: list[Any], box: np.ndarray) -> Any:
    """The track just started from ``box`` (its state is that box), taken out of ``candidates``."""
    if not candidates:
        return None
    distances = [float(np.abs(np.asarray(t.get_state_bbox(), dtype=np.float64).reshape(-1)[:4] - box).sum())
                 for t in candidates]
    best = int(np.argmin(distances))
    return candidates.pop(best)
