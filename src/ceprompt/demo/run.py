"""``ceprompt demo``: the whole method on generated data and a small CLIP, on a CPU, in minutes.

Steps: generate a RAF-DB-layout dataset, pretrain (or reuse) the demo CLIP, zero-shot baseline,
stage 1, stage 2, and a report folder. Everything goes through the same loaders, trainer and
evaluator as real data; the configs are ``configs/demo_stage{1,2}.yaml``.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.owned_dirs import OwnedDir
from ..core.ranges import Range, check
from ..core.runtime import resolve_precision
from ..core.schema import read_json
from ..engine.threads import set_threads
from ..engine.train import train
from ..experiment.config import load_config
from ..verbs.eval_job import run_eval
from .pretrain import PretrainSettings, cached_clip, demo_clip_path
from .report import seed_row, write_demo_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_test: int
    pretrain: PretrainSettings
    stage1_epochs: int
    stage2_epochs: int
    overrides: dict[str, Any] = field(default_factory=dict)  # config values beside the epochs


# The times and accuracies of both plans are measured by benchmarks/demo_benchmark.py and quoted in README (one
# source). With 200 pretraining steps instead of 400 the quick demo CLIP collapsed (stage 1 stayed at chance).
# Stage 2 needs 6 epochs even in the quick plan: it starts from its own prompts, which the demo CLIP's text tower
# puts far from stage 1's, and with 3 epochs its accuracy varied widely over seeds.
FULL = DemoPlan(n_train=2800, n_test=700, pretrain=PretrainSettings(), stage1_epochs=12, stage2_epochs=6)
QUICK = DemoPlan(n_train=1050, n_test=350, pretrain=PretrainSettings(steps=400), stage1_epochs=6, stage2_epochs=6,
                 overrides={"run.eval_every": 3})


def _has_report(folder: Path) -> bool:
    return ((folder / "report" / "results.json").is_file() or (folder / "stage1").is_dir()
            or any(folder.glob("seed-*")))


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overwrite: bool = False,
             workers: int = 2, progress: bool = True, threads: int | None = None, seeds: int = 1,
             precision: str = "auto") -> dict[str, Any]:
    """Run the demo; returns the results table (also written to ``out/report/results.json``).

    With ``seeds`` > 1 both stages are trained once per seed (``seed``, ``seed + 1``, ...) on the same
    data and demo CLIP, and the table gives mean and standard deviation over the seeds.
    """
    check("seeds", seeds, Range(1, 100, integer=True))
    if precision == "auto":
        # fp32 everywhere: auto would pick bf16 on CPUs with native bf16 and fp32 on the others, so the demo's
        # figures would depend on the machine type; and its 64 px, 4-block models gain little from bf16 (full
        # demo, demo CLIP cached: 135 s in bf16, 142 s in fp32 on the same machine).
        precision = "fp32"
    plan = QUICK if quick else FULL
    owned = OwnedDir(Path(out), "demo folder", _has_report, overwrite,
                     elsewhere="choose another folder with --out").plan()
    with owned.replacing() as folder:
        return _run(folder, plan, quick, seed, seeds, workers, progress, threads, precision)


def _run(out: Path, plan: DemoPlan, quick: bool, seed: int, seeds: int, workers: int, progress: bool,
         threads: int | None, precision: str) -> dict[str, Any]:
    from .faces import write_rafdb_dataset

    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    data = write_rafdb_dataset(out / "data", plan.n_train, plan.n_test, seed=seed, workers=workers)
    lap("generate data", t0)
    log.info("generated %d training and %d test faces in %s", plan.n_train, plan.n_test, data)

    used_threads = set_threads(threads)
    t0 = time.perf_counter()
    cached_full = cached_clip(FULL.pretrain)
    if quick and cached_full is not None:
        log.info("quick demo: using the cached full demo CLIP")
    reused_full = bool(quick and cached_full)
    clip = cached_full if reused_full else demo_clip_path(plan.pretrain, progress=progress, workers=workers,
                                                                     threads=threads)
    clip_steps = (FULL if reused_full or not quick else QUICK).pretrain.steps
    lap("demo CLIP", t0)

    common = {"backbone.path": clip, "data.root": data, "run.progress": progress, "run.threads": threads or 0,
              "run.precision": precision, **plan.overrides}
    t0 = time.perf_counter()
    zero_shot = run_eval(data, zero_shot_config=load_config("demo_stage1", values={**common, "run.output_dir": out}),
                         out=out / "zero_shot", device="cpu", precision=precision, workers=0, progress=progress)
    lap("zero-shot", t0)

    per_seed: list[dict[str, Any]] = []
    for s in range(seed, seed + seeds):
        folder = out if seeds == 1 else out / f"seed-{s}"
        here = {**common, "run.output_dir": folder, "run.seed": s}
        t0 = time.perf_counter()
        run1 = train(load_config("demo_stage1", values={**here, "optim.epochs": plan.stage1_epochs}))
        lap("stage 1", t0)
        t0 = time.perf_counter()
        run2 = train(load_config("demo_stage2", values={**here, "backbone.init": run1,
                                                        "optim.epochs": plan.stage2_epochs}))
        lap("stage 2", t0)
        per_seed.append({"seed": s, "stage1": _metrics(run1), "stage2": _metrics(run2), "runs": [str(run1), str(run2)]})

    timings["total"] = round(time.perf_counter() - start, 1)
    zero = {"accuracy": zero_shot["accuracy"], "macro_f1": zero_shot["macro_f1"]}
    results = {
        "rows": [seed_row("zero-shot CLIP", [zero]),
                 seed_row("after stage 1 (EVA)", [p["stage1"] for p in per_seed]),
                 seed_row("after stage 2 (CAT)", [p["stage2"] for p in per_seed])],
        "chance": 1 / len(zero_shot["class_names"]),
        "n_train": plan.n_train,
        "n_test": plan.n_test,
        "quick": quick,
        "seeds": [p["seed"] for p in per_seed],
        "per_seed": per_seed,
        "threads": _threads_used([Path(r) for p in per_seed for r in p["runs"]], used_threads),
        "demo_clip": {"path": str(clip), "pretraining_steps": clip_steps,
                      "which": "the full demo's, cached" if reused_full else ("the quick demo's" if quick else
                                                                               "the full demo's")},
        "precision": resolve_precision(precision, torch.device("cpu")),
        "seconds": timings,
        "runs": {"zero_shot": str(out / "zero_shot"), "stage1": per_seed[0]["runs"][0], "stage2": per_seed[0]["runs"][1]},
    }
    write_demo_report(out / "report", results, Path(per_seed[0]["runs"][0]), Path(per_seed[0]["runs"][1]))
    return results


def _threads_used(runs: list[Path], fallback: int) -> str:
    """The CPU thread counts the stages really ran with (each epoch's, from summary.csv): "2", or "1-2"."""
    counts = set()
    for run in runs:
        with open(run / "summary.csv", newline="") as fh:
            counts.update(int(row["threads"]) for row in csv.DictReader(fh) if row.get("threads"))
    if not counts:
        return str(fallback)
    return str(min(counts)) if len(counts) == 1 else f"{min(counts)}-{max(counts)}"


def _metrics(run: Path) -> dict[str, float]:
    where = run / "eval" / "metrics.json"
    metrics = read_json(where.read_bytes(), str(where))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
