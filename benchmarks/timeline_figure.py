"""README's timeline picture (docs/images/timeline.png): three people whose expressions change, followed by
ceprompt's tracking and smoothing and drawn by ``--timeline``'s code, with the demo model's real answers.

    python benchmarks/timeline_figure.py [MODEL]   # default: the quick demo's model (ceprompt demo --quick)

The faces are the demo's drawn ones (the demo model knows them; MTCNN does not see drawn faces, so their boxes are
given: three people side by side, the second one hidden for a second, the third arriving at 2 s). Each person's
expression follows a schedule; every sampled frame (5 a second) draws a new face of that expression, so the
frame-to-frame noise the smoothing removes is the model's own.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import ceprompt
from ceprompt.data.faces import DetectedFace
from ceprompt.demo.faces import draw_face, sample_expression, sample_look
from ceprompt.video.summary import VideoSummary, plot_timeline
from ceprompt.video.tracking import FaceTracks

ROOT = Path(__file__).resolve().parents[1]
# (start, end, expression) per person; seconds
SCHEDULES = [
    [(0.0, 3.0, "neutral"), (3.0, 6.0, "happy"), (6.0, 8.0, "surprise")],
    [(0.0, 2.5, "sad"), (3.5, 8.0, "neutral")],  # hidden from 2.5 to 3.5 s
    [(2.0, 5.0, "anger"), (5.0, 8.0, "disgust")],
]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache/ceprompt/demo/serve/stage2")
    rec = ceprompt.load(model, device="cpu", precision="fp32")
    size = rec.preprocess.image_size
    rng = random.Random(0)
    looks = [sample_look(rng) for _ in SCHEDULES]
    tracks = FaceTracks(rec.class_names, smooth=0.5)
    summary = VideoSummary(rec.class_names, keep_timeline=True)
    for step in range(40):
        t = step / 5
        faces = []
        for person, schedule in enumerate(SCHEDULES):
            expression = next((name for start, end, name in schedule if start <= t < end), None)
            if expression is None:
                continue
            crop = draw_face(sample_expression(expression, rng), looks[person], size, rng)
            box = (40.0 + 300 * person, 80.0, 40.0 + 300 * person + 200, 280.0)
            faces.append((DetectedFace(box, None, 0.99), crop))
        results, embeddings = rec.classify([faces])
        summary.add(ceprompt.video.tracking.FrameRecord(t, tracks.update(t, results[0], embeddings[0])))
    out = ROOT / "docs" / "images" / "timeline.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_timeline(summary, "demo: 3 tracks, smoothed expression over time (drawn faces, the demo model)", out)
    for row in summary.rows():
        print(row["track"], row["first_time"], row["last_time"], row["dominant"])
    print(f"written to {out}")


if __name__ == "__main__":
    main()
