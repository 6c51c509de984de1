"""Video throughput and memory: ``rec.predict_video`` end to end against its parts, and memory against length.

    python benchmarks/video.py [--arch ViT-B-16] [--frames 60] [--precisions fp32 bf16] [--busy] [--out FILE]

* Frames per second of the whole pipeline (decoding in its thread, faces detected frame by frame, the faces of 8
  frames classified together, tracks, smoothing) at stride 1 on a 1280x720 clip with 1 and with 5 faces (real ones:
  scikit-image's astronaut, moving), against the same frames' decode alone, detection alone and model alone (the
  same crops, batched as the pipeline batches them). The goal: end to end at least 0.8 of 1 / (decode + detect +
  classify per frame).
* Peak memory (a fresh process each) for a 1-minute against a 10-minute clip (320x240, 10 fps, one face; sampled at
  1 frame per second): constant memory means the same peak.

Random weights of the named architecture (nothing is downloaded). Results go to ``benchmarks/results/video.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test videos' composer

from speed import machine  # noqa: E402
from videos import frame, head, moving, write_video  # noqa: E402

from bench_common import BUSY_NEIGHBOUR, ROOT, stage2_model  # noqa: E402
from speed_verbs import recognizer  # noqa: E402

SIZE = (1280, 720)


def clip(path: Path, faces: int, n: int, size: tuple[int, int] = SIZE, rate: int = 30, width: int = 140) -> Path:
    """``faces`` heads moving across the frame in rows (a group video)."""
    columns = max(1, min(faces, 5))
    paths = []
    for k in range(faces):
        x, y = 40 + (k % columns) * (size[0] - 200) / max(columns - 1, 1) * 0.9, 60 + (k // columns) * 260
        paths.append(moving((x, y), (x + 120, y + 30), n))
    face = head(width)
    return write_video(path, [frame(size, [p[i] for p in paths], face=face) for i in range(n)], rate=rate)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(rec, video: Path, n: int) -> dict[str, float]:
    """Seconds per frame of each part, and frames per second end to end (the end to end run goes first and last,
    the parts between, so that a shared machine's drift hits both sides)."""
    from ceprompt.video.decode import VideoReader

    end_to_end = [seconds(lambda: list(rec.predict_video(video, stride=1)))]
    frames: list = []
    decode = seconds(lambda: frames.extend(f.image for f in VideoReader(video, stride=1)))
    found: list = []
    detect = seconds(lambda: found.extend(rec.find_faces(image) for image in frames))
    groups = [found[i:i + 8] for i in range(0, len(found), 8)]  # as the pipeline batches them
    classify = seconds(lambda: [rec.classify(group, 32) for group in groups])
    end_to_end.append(seconds(lambda: list(rec.predict_video(video, stride=1))))
    parts = (decode + detect + classify) / n
    fps = n / min(end_to_end)
    return {"frames": n, "faces per frame": sum(map(len, found)) / n, "decode s/frame": decode / n,
            "detect s/frame": detect / n, "classify s/frame": classify / n, "end to end fps": fps,
            "end to end / parts": fps * parts}


def memory_case(arch: str, video: str, fps: float) -> dict:
    """In a fresh process: the peak resident memory of a pass over ``video``."""
    rec = recognizer(stage2_model(arch, "cpu", training=False), arch, "cpu", "auto")
    samples = sum(1 for _ in rec.predict_video(video, fps=fps))
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    return {"samples": samples, "peak_mib": round(peak)}


def memory(arch: str, folder: Path) -> dict:
    out = {}
    for minutes in (1, 10):
        n = minutes * 600
        video = clip(folder / f"{minutes}min.mkv", 1, n, size=(320, 240), rate=10, width=90)
        proc = subprocess.run([sys.executable, __file__, "--memory-case", arch, str(video), "1"], capture_output=True,
                              text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        out[f"{minutes} min"] = json.loads(proc.stdout.strip().splitlines()[-1])
        video.unlink()
    out["10 min / 1 min peak"] = round(out["10 min"]["peak_mib"] / out["1 min"]["peak_mib"], 3)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-case":
        print(json.dumps(memory_case(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "video.json"))
    args = parser.parse_args()
    from ceprompt.engine.threads import set_threads

    neighbour = subprocess.Popen(BUSY_NEIGHBOUR) if args.busy else None
    try:
        set_threads(None)
        report = {"machine": machine("cpu", args.busy), "arch": args.arch, "size": list(SIZE), "results": {}}
        model = stage2_model(args.arch, "cpu", training=False)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for faces in (1, 5):
                video = clip(folder / f"{faces}.mp4", faces, args.frames)
                for precision in args.precisions:
                    rec = recognizer(model, args.arch, "cpu", precision)
                    key = f"{faces} face{'s' if faces > 1 else ''}, {precision}"
                    report["results"][key] = result = throughput(rec, video, args.frames)
                    print(f"{key:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
            if args.memory:
                report["memory"] = memory(args.arch, folder)
                print("memory", json.dumps(report["memory"]), flush=True)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
