"""Wall time, peak memory and accuracy of `ceprompt demo` (full and --quick), with a fresh and a warm model
cache, and the full demo over three seeds (mean ± std, the README's table).

    python benchmarks/demo_benchmark.py [--out benchmarks/results/demo.json] [--only full|quick] [--seeds 3]

Each case runs the real command in a subprocess; peak memory is that child's own high-water mark
(VmHWM, read from /proc while it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _high_water_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_case(quick: bool, cache: Path, out: Path, seeds: int = 1) -> dict:
    cmd = [sys.executable, "-m", "ceprompt", "demo", "--out", str(out), "--overwrite", "--no-progress",
           "--seeds", str(seeds)]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "CEPROMPT_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _high_water_mib(proc.pid) or 0.0)
        time.sleep(0.2)
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(stderr[-2000:])
    results = json.loads((out / "report" / "results.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak), "steps": results["seconds"],
            "threads": results.get("threads"), "seeds": results.get("seeds"),
            "accuracy": {r["step"]: round(r["accuracy"], 4) for r in results["rows"]},
            "accuracy_std": {r["step"]: round(r.get("accuracy_std", 0.0), 4) for r in results["rows"]},
            "macro_f1": {r["step"]: round(r["macro_f1"], 4) for r in results["rows"]},
            "macro_f1_std": {r["step"]: round(r.get("macro_f1_std", 0.0), 4) for r in results["rows"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/demo.json")
    parser.add_argument("--only", choices=["full", "quick"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the extra full-demo case (0: skip it)")
    args = parser.parse_args()
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("quick", "full"):
            if args.only and args.only != name:
                continue
            cache = Path(tmp) / f"cache-{name}"
            states = [("fresh cache", 1), ("warm cache", 1)]
            if name == "full" and args.seeds > 1:
                states.append((f"warm cache, {args.seeds} seeds", args.seeds))
            for state, seeds in states:
                case = run_case(name == "quick", cache, Path(tmp) / f"out-{name}", seeds)
                report["cases"][f"{name}, {state}"] = case
                print(f"{name:5s} {state:20s} {case['seconds']:7.1f} s  peak RSS {case['peak_rss_mib']} MiB"
                      f"  accuracy {case['accuracy']} std {case['accuracy_std']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
