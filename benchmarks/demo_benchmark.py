"""Wall time, peak memory and accuracy of `ceprompt demo` (full and --quick), with a fresh and a warm model
cache, and the full demo over three seeds (mean ± std, the README's table).

    python benchmarks/demo_benchmark.py [--out benchmarks/results/demo.json] [--seeds 3] [--readme README.md]

Each case runs the real command in a subprocess; peak memory is that child's own high-water mark
(VmHWM, read from /proc while it runs). The README's demo table is written from the results (between its
``demo-table`` markers), so the two cannot disagree; ``--table-only`` rewrites it from an existing results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
            "threads": results.get("threads"), "seeds": results.get("seeds"), "precision": results.get("precision"),
            "demo_clip": (results.get("demo_clip") or {}).get("which"),
            "train_test": [results.get("n_train"), results.get("n_test")],
            "accuracy": {r["step"]: round(r["accuracy"], 4) for r in results["rows"]},
            "accuracy_std": {r["step"]: round(r.get("accuracy_std", 0.0), 4) for r in results["rows"]},
            "macro_f1": {r["step"]: round(r["macro_f1"], 4) for r in results["rows"]},
            "macro_f1_std": {r["step"]: round(r.get("macro_f1_std", 0.0), 4) for r in results["rows"]}}


CASES = [  # (name, quick, model cache, seeds); the quick demo reuses the full demo's CLIP when that is cached
    ("quick, fresh cache", True, "quick", 1),
    ("quick, warm cache", True, "quick", 1),
    ("full, fresh cache", False, "full", 1),
    ("full, warm cache", False, "full", 1),
    ("full, warm cache, seeds", False, "full", 0),
    ("quick, the full demo's CLIP cached", True, "full", 1),
]
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def _accuracy(case: dict, step: str) -> str:
    value, std = case["accuracy"][step], case["accuracy_std"][step]
    return f"{value:.3f} ± {std:.3f}" if len(case.get("seeds") or []) > 1 else f"{value:.3f}"


def readme_table(report: dict) -> str:
    """The README's demo table, from a results file of this script."""
    lines = ["| run | demo CLIP | threads, precision | wall time | peak memory | zero-shot | after stage 1 | "
             "after stage 2 |", "|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        quick = name.startswith("quick")
        train, test = case.get("train_test") or [None, None]
        seeds = case.get("seeds") or [0]
        several = f" --seeds {len(seeds)}" if len(seeds) > 1 else ""
        command = "`ceprompt demo" + (" --quick" if quick else "") + several
        command += f"` ({train} / {test} faces)" if train else "`"
        state = re.sub(r", \d+ seeds$", "", name.split(", ", 1)[1])
        steps = list(case["accuracy"])
        lines.append(f"| {command}, {state} | {case.get('demo_clip') or '?'} | {case.get('threads')}, "
                     f"{case.get('precision')} | {case['seconds']:.0f} s | {case['peak_rss_mib'] / 1024:.1f} GB | "
                     + " | ".join(_accuracy(case, step) for step in steps) + " |")
    return "\n".join(lines) + "\n"


def write_readme_table(report: dict, readme: Path) -> None:
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    readme.write_text(text[:start] + "\n" + readme_table(report) + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/demo.json")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the full demo's several-seed case (<2: skip it)")
    parser.add_argument("--readme", default="README.md", help="README whose demo table to rewrite ('' for none)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the README table from --out")
    args = parser.parse_args()
    if args.table_only:
        write_readme_table(json.loads(Path(args.out).read_text()), Path(args.readme))
        return
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quick, cache, seeds in CASES:
            seeds = seeds or args.seeds
            if seeds < 2 and name.endswith("seeds"):
                continue
            case = run_case(quick, Path(tmp) / f"cache-{cache}", Path(tmp) / "out", seeds)
            report["cases"][name.replace("seeds", f"{seeds} seeds")] = case
            print(f"{name:36s} {case['seconds']:7.1f} s  peak RSS {case['peak_rss_mib']} MiB"
                  f"  accuracy {case['accuracy']} std {case['accuracy_std']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    if args.readme:
        write_readme_table(report, Path(args.readme))
        print(f"table rewritten in {args.readme}")


if __name__ == "__main__":
    main()
