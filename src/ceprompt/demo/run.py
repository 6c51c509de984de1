"""``ceprompt demo``: the whole method on generated data and a small CLIP, on a CPU, in minutes.

Steps: generate a RAF-DB-layout dataset, pretrain (or reuse) the demo CLIP, zero-shot baseline,
stage 1, stage 2, and a report folder. Everything goes through the same loaders, trainer and
evaluator as real data; the configs are ``configs/demo_stage{1,2}.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config
from ..engine.eval_job import run_eval
from ..engine.train import train
from ..owned_dirs import OwnedDir
from .pretrain import PretrainSettings, cached_clip, demo_clip_path
from .report import write_demo_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_test: int
    pretrain: PretrainSettings
    stage1_epochs: int
    stage2_epochs: int
    overrides: tuple[str, ...] = field(default_factory=tuple)


# Measured on 2 CPU cores (README): the full plan about 7 minutes on a first run, 3 with its CLIP cached;
# the quick one about 3 and under 1. With 200 pretraining steps instead of 400 the quick demo CLIP
# collapsed (stage 1 stayed at chance), so the quick first run stays near 3 minutes.
FULL = DemoPlan(n_train=2800, n_test=700, pretrain=PretrainSettings(), stage1_epochs=12, stage2_epochs=6)
QUICK = DemoPlan(n_train=1050, n_test=350, pretrain=PretrainSettings(steps=400), stage1_epochs=6, stage2_epochs=3,
                 overrides=("run.eval_every=3",))


def _has_report(folder: Path) -> bool:
    return (folder / "report" / "results.json").is_file() or (folder / "stage1").is_dir()


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overwrite: bool = False,
             workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns the results table (also written to ``out/report/results.json``)."""
    plan = QUICK if quick else FULL
    owned = OwnedDir(Path(out), "demo folder", _has_report, overwrite).plan()
    out = owned.open()
    try:
        results = _run(out, plan, quick, seed, workers, progress)
    except BaseException:
        owned.rollback()
        raise
    else:
        owned.commit()
    finally:
        owned.close()
    return results


def _run(out: Path, plan: DemoPlan, quick: bool, seed: int, workers: int, progress: bool) -> dict[str, Any]:
    from .faces import write_rafdb_dataset

    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    data = write_rafdb_dataset(out / "data", plan.n_train, plan.n_test, seed=seed, workers=workers)
    lap("generate data", t0)
    log.info("generated %d training and %d test faces in %s", plan.n_train, plan.n_test, data)

    t0 = time.perf_counter()
    cached_full = cached_clip(FULL.pretrain)
    if quick and cached_full is not None:
        log.info("quick demo: using the cached full demo CLIP")
    clip = cached_full if quick and cached_full else demo_clip_path(plan.pretrain, progress=progress, workers=workers)
    lap("demo CLIP", t0)

    common = [f"backbone.path={clip}", f"data.root={data}", f"run.output_dir={out}", f"run.seed={seed}",
              f"run.progress={str(progress).lower()}", *plan.overrides]
    t0 = time.perf_counter()
    zero_shot = run_eval(data, zero_shot_config=load_config("demo_stage1", common), out=out / "zero_shot",
                         device="cpu", workers=0, progress=progress)
    lap("zero-shot", t0)

    t0 = time.perf_counter()
    run1 = train(load_config("demo_stage1", [*common, f"optim.epochs={plan.stage1_epochs}"]))
    lap("stage 1", t0)
    t0 = time.perf_counter()
    run2 = train(load_config("demo_stage2", [*common, f"backbone.init={run1}",
                                             f"optim.epochs={plan.stage2_epochs}"]))
    lap("stage 2", t0)

    stage1 = json.loads((run1 / "eval" / "metrics.json").read_text())
    stage2 = json.loads((run2 / "eval" / "metrics.json").read_text())
    timings["total"] = round(time.perf_counter() - start, 1)
    results = {
        "rows": [
            {"step": "zero-shot CLIP", "accuracy": zero_shot["accuracy"], "macro_f1": zero_shot["macro_f1"]},
            {"step": "after stage 1 (EVA)", "accuracy": stage1["accuracy"], "macro_f1": stage1["macro_f1"]},
            {"step": "after stage 2 (CAT)", "accuracy": stage2["accuracy"], "macro_f1": stage2["macro_f1"]},
        ],
        "chance": 1 / len(stage2["class_names"]),
        "n_train": plan.n_train,
        "n_test": plan.n_test,
        "quick": quick,
        "seconds": timings,
        "runs": {"zero_shot": str(out / "zero_shot"), "stage1": str(run1), "stage2": str(run2)},
    }
    write_demo_report(out / "report", results, run1, run2)
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'':24s} {'accuracy':>9s} {'macro-F1':>9s}"]
    for row in results["rows"]:
        lines.append(f"{row['step']:24s} {row['accuracy']:9.3f} {row['macro_f1']:9.3f}")
    lines.append(f"{'chance':24s} {results['chance']:9.3f}")
    return "\n".join(lines)
