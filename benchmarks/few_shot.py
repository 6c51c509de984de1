"""Few-shot curve on the demo data: stage 1 (EVA) trained on K = 1, 2, 4, 8, 16 images per class (``data.shots``),
drawn with each seed, evaluated on the full test split; accuracy against K as a plot and a table.

    python benchmarks/few_shot.py [--out benchmarks/results/few_shot] [--shots 1 2 4 8 16] [--seeds 3] [--steps 100]

Every K gets the same number of optimiser steps (a handful of epochs would give K = 1 six steps), evaluated once
at the end.

Uses the quick demo's data (generated here) and the demo CLIP cached by ``ceprompt demo`` (the full one when
cached, else the quick one, pretrained now if needed). Writes ``few_shot.json`` and ``few_shot.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from ceprompt.demo.faces import write_rafdb_dataset
from ceprompt.demo.pretrain import cached_clip, demo_clip_path
from ceprompt.demo.run import FULL, QUICK
from ceprompt.engine.train import train
from ceprompt.experiment.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/few_shot")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps of every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = cached_clip(FULL.pretrain) or demo_clip_path(QUICK.pretrain, progress=False)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_rafdb_dataset(Path(tmp) / "data", QUICK.n_train, QUICK.n_test, seed=0, workers=2)
        for k in args.shots:
            batch = min(32, 7 * k)
            epochs = math.ceil(args.steps / math.ceil(7 * k / batch))
            for seed in range(args.seeds):
                start = time.perf_counter()
                cfg = load_config("demo_stage1", [f"backbone.path={clip}", f"data.root={data}", f"data.shots={k}",
                                                  f"run.seed={seed}", f"optim.epochs={epochs}",
                                                  "optim.warmup_epochs=0", f"run.output_dir={tmp}/runs",
                                                  f"run.name=k{k}-s{seed}", "run.progress=false",
                                                  "run.log_to=[]", f"optim.batch_size={batch}",
                                                  f"run.eval_every={epochs}"])
                run = train(cfg)
                accuracy = json.loads((run / "eval" / "metrics.json").read_text())["accuracy"]
                results.setdefault(str(k), []).append(accuracy)
                print(f"K={k:3d} seed {seed}: accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    summary = {"clip": Path(clip).name, "steps": args.steps, "test_images": QUICK.n_test, "chance": 1 / 7,
               "accuracy": {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                "runs": v} for k, v in results.items()}}
    (out / "few_shot.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "few_shot.png")
    print(f"written to {out}/few_shot.json and few_shot.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in summary["accuracy"])
    means = [summary["accuracy"][str(k)]["mean"] for k in ks]
    stds = [summary["accuracy"][str(k)]["std"] for k in ks]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label="stage 1 (EVA)")
    ax.axhline(summary["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("training images per class (K)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Few-shot on the demo data ({summary['test_images']} test faces)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
