"""Host synchronisations and bookkeeping kernels per training step, counted with torch.profiler on the CPU.

On a GPU every ``.item()`` (``aten::_local_scalar_dense``) and every collective waits for the device's queue to
drain; ``aten::isfinite`` calls are the finiteness checks. One epoch of the tiny architecture on generated data,
stage 1 and stage 2, micro-batch 8 with 2 accumulation steps, counted per optimiser step; the augmentation runs in
a loader process and the reads the fused CPU AdamW kernel makes of its own step counts (none on a GPU) are left
out, so only what the training step itself asks for is counted:

    python benchmarks/step_syncs.py LABEL      # adds LABEL's counts to benchmarks/results/step_syncs.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ceprompt.core.runtime import setup_runtime, teardown_runtime  # noqa: E402
from ceprompt.engine.train import Trainer  # noqa: E402
from ceprompt.experiment.config import load_config  # noqa: E402

from helpers import write_three_file_dataset  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "step_syncs.json"
COUNTED = {"aten::_local_scalar_dense": "host syncs (.item())", "aten::isfinite": "finiteness kernels",
           "aten::all": "reductions of the finiteness checks"}


def count(stage: str, data: Path, work: Path) -> dict:
    init = {}
    if stage == "cat":
        init = {"backbone.init": str(work / "eva-run")}
    cfg = load_config(f"rafdb_stage{1 if stage == 'eva' else 2}", values={
        "backbone.arch": "tiny-vit", "data.root": str(data), "data.workers": 1, "optim.batch_size": 16,
        "optim.accum_steps": 2, "optim.epochs": 1, "optim.warmup_epochs": 0, "run.device": "cpu",
        "run.precision": "fp32", "run.progress": False, "run.log_to": [], "run.output_dir": str(work),
        "run.name": f"{stage}-run", "head.top_k": 4, **init,
        **({"cat.prompt_depth": 3} if stage == "cat" else {})})
    rt = setup_runtime("cpu", "fp32")
    try:
        trainer = Trainer(cfg, rt)
        run_dir = work / f"{stage}-run"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text("")
        trainer.attach(run_dir, resuming=False)
        trainer.train_epoch(0)  # warm-up (and a run to build stage 2 on)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_epoch(0)
        if stage == "eva":
            trainer._save(0, None, [trainer.model.extra_state()])
    finally:
        teardown_runtime(rt)
    events: Counter = Counter()
    for event in prof.events():
        parent, inside_optimizer = event.cpu_parent, False
        while parent is not None:  # the fused CPU AdamW reads its step counts itself; on a GPU it does not
            inside_optimizer |= parent.name.startswith("Optimizer.step")
            parent = parent.cpu_parent
        if not inside_optimizer:
            events[event.name] += 1
    steps = trainer.steps_per_epoch
    return {"optimizer_steps": steps, "micro_batches": steps * cfg.optim.accum_steps,
            **{label: round(events.get(name, 0) / steps, 1) for name, label in COUNTED.items()}}


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_three_file_dataset(work / "RAF-DB", "rafdb", n_train=16, n_test=2)
        results = {stage: count(stage, data, work) for stage in ("eva", "cat")}
    for stage, row in results.items():
        print(stage, row)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {}
    label = sys.argv[1] if len(sys.argv) > 1 else "now"
    previous[label] = results
    OUT.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {OUT} ({label})")


if __name__ == "__main__":
    main()
