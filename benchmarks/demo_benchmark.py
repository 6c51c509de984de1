"""Wall time and peak memory of `ceprompt demo` (full and --quick), with a fresh and a warm model cache.

    python benchmarks/demo_benchmark.py [--out benchmarks/results/demo.json] [--only full|quick]

Each case runs the real command in a subprocess; peak memory is the child's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_case(quick: bool, cache: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ceprompt", "demo", "--out", str(out), "--overwrite", "--no-progress"]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "CEPROMPT_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    # ru_maxrss of finished children: the largest of them so far (kilobytes on Linux)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = json.loads((out / "report" / "results.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mib_so_far": round(peak_mib), "steps": results["seconds"],
            "accuracy": {r["step"]: round(r["accuracy"], 4) for r in results["rows"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/demo.json")
    parser.add_argument("--only", choices=["full", "quick"])
    args = parser.parse_args()
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("quick", "full"):
            if args.only and args.only != name:
                continue
            cache = Path(tmp) / f"cache-{name}"
            for state in ("fresh cache", "warm cache"):
                case = run_case(name == "quick", cache, Path(tmp) / f"out-{name}")
                report["cases"][f"{name}, {state}"] = case
                print(f"{name:5s} {state:11s} {case['seconds']:7.1f} s  peak RSS <= {case['peak_rss_mib_so_far']} MiB"
                      f"  accuracy {case['accuracy']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
