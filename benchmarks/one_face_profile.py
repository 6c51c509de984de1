"""Where a face alone spends its time: the top operators of a ViT-B/16 stage-2 recognizer at batch 1 (bf16),
on two threads (every core, what a recognizer used before it followed the load) and on the count it now chooses,
with another process keeping one core busy (``--idle``: without it). torch.profiler's self CPU time per operator,
as shares of the total, and seconds per face; both settings in one process, one after the other.

    python benchmarks/one_face_profile.py [--idle] [--arch ViT-B-16]

Writes ``one_face_profile.json`` (``one_face_profile-idle.json`` with ``--idle``) in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from torch.profiler import ProfilerActivity, profile

import speed_verbs as verbs
from bench_common import BUSY_NEIGHBOUR, ROOT, cpu_description, stage2_model


def top_operators(rec, crop, calls: int = 3, top: int = 6) -> dict:
    rec.predict_batch(crop, detect="none", batch_size=1)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            rec.predict_batch(crop, detect="none", batch_size=1)
        seconds = (time.perf_counter() - start) / calls
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "share of self time": round(e.self_cpu_time_total / total, 3),
            "calls per face": e.count // calls, "ms per call": round(e.self_cpu_time_total / e.count / 1000, 3)}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return {"seconds per face": round(seconds, 3), "top operators": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", action="store_true", help="no busy neighbour")
    parser.add_argument("--arch", default="ViT-B-16")
    args = parser.parse_args()
    rec = verbs.recognizer(stage2_model(args.arch, "cpu"), args.arch, "cpu", "bf16")
    crop = [verbs.astronaut().resize((224, 224))]
    neighbour = None if args.idle else subprocess.Popen(BUSY_NEIGHBOUR)
    try:
        time.sleep(2.5)  # longer than a recognizer's re-check interval
        chosen = rec._threads.follow()  # what the recognizer chooses for this load
        results = {}
        for name, threads in (("every core (2 threads)", 2), (f"chosen from the load ({chosen} thread(s))", chosen)):
            rec._threads.threads, rec._threads.fixed = threads, True
            results[name] = top_operators(rec, crop)
            print(name, json.dumps(results[name], indent=1))
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    cpu, flags = cpu_description()
    out = ROOT / "benchmarks" / "results" / f"one_face_profile{'-idle' if args.idle else ''}.json"
    out.write_text(json.dumps({"cpu": cpu, "flags": flags, "busy neighbour": not args.idle, "arch": args.arch,
                               "precision": "bf16", "results": results}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
