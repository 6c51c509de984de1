"""CPU threads on an idle and on a busy machine: ceprompt's default against fixed thread counts.

Two workloads, each in a fresh process so that the thread count is set before any work:

* ``train``: a one-epoch stage-1 training of the demo's architecture (random weights) on 1050 generated
  faces; throughput is the trainer's own train images per second (start-up excluded);
* ``pretrain``: 40 steps of the demo CLIP's contrastive pretraining (batch 64), pairs per second.

Each runs with the default (no ``--threads``), with 1 thread and with every usable core, on an idle
machine and beside a neighbour process that keeps one core busy. Prints img/s, the default's ratio to
the best setting, and writes ``benchmarks/results/threads.json``.

    python benchmarks/threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import BUSY_NEIGHBOUR

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = """
import sys, time
from ceprompt.engine.threads import set_threads
threads = set_threads(int(sys.argv[1]) or None)
from ceprompt.demo.pretrain import PretrainSettings, pretrain_clip
settings = PretrainSettings(steps=40, pairs=600)
_, stats = pretrain_clip(settings, progress=False, threads=int(sys.argv[1]) or None)
print(settings.steps * settings.batch_size / (stats["seconds"] - stats["generate_seconds"]), threads)
"""


def run_train(data: Path, work: Path, threads: int) -> tuple[float, int]:
    name = f"t{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "ceprompt", "train", "--config", "demo_stage1", "--no-progress",
           "--set", "backbone.arch=demo-vit", "--set", "backbone.path=null", "--set", f"data.root={data}",
           "--set", "optim.epochs=1", "--set", "run.final_eval=false", "--set", "run.eval_every=100",
           "--output-dir", str(work), "--name", name]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, capture_output=True)
    row = (work / name / "summary.csv").read_text().splitlines()[-1].split(",")
    return float(row[-2]), int(row[-1])


def run_pretrain(threads: int) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", PRETRAIN, str(threads)], check=True, capture_output=True, text=True)
    rate, used = out.stdout.split()[-2:]
    return float(rate), int(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    args = parser.parse_args()
    from ceprompt.engine.threads import usable_cpus

    cores = usable_cpus()
    settings = {"default": 0, "1 thread": 1, f"{cores} threads (all cores)": cores}
    results: dict = {"machine": {"usable_cores": cores, "cpu": platform.processor() or platform.machine(),
                                 "python": platform.python_version()}, "situations": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "ceprompt", "make-demo-data", str(work / "data"), "--n-train", "1050",
                        "--n-test", "70"], check=True, capture_output=True)
        for situation in ("idle", "one core busy"):
            neighbour = None
            if situation != "idle":
                neighbour = subprocess.Popen(BUSY_NEIGHBOUR)
                time.sleep(1.0)
            try:
                table: dict = {}
                for workload, runner in (("train", lambda t: run_train(work / "data", work, t)),
                                         ("pretrain", run_pretrain)):
                    rates: dict[str, list[float]] = {name: [] for name in settings}
                    used: dict[str, list[int]] = {name: [] for name in settings}
                    for _ in range(args.repeats):  # interleaved, so that drift hits every setting alike
                        for name, threads in settings.items():
                            rate, n = runner(threads)
                            rates[name].append(rate)
                            used[name].append(n)
                    medians = {name: statistics.median(v) for name, v in rates.items()}
                    best = max(medians.values())
                    table[workload] = {"images_per_second": medians, "runs": rates, "threads_used": used,
                                       "default_vs_best": medians["default"] / best}
                    print(f"{situation:14s} {workload:9s} " + "  ".join(
                        f"{name} {value:7.1f}" for name, value in medians.items())
                        + f"   default/best {medians['default'] / best:.2f}  (default chose {used['default']})",
                        flush=True)
                results["situations"][situation] = table
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    worst = min(t["default_vs_best"] for s in results["situations"].values() for t in s.values())
    print(f"worst default/best ratio: {worst:.2f} (wrote {args.out})")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
