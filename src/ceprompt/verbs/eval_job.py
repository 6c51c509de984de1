"""``ceprompt eval``: a trained checkpoint (or zero-shot CLIP) on a dataset split, with a full report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.errors import ConfigError
from ..core.paths import output_dir, removed_on_failure
from ..core.ranges import POSITIVE_INT, check
from ..core.runtime import Runtime, setup_runtime, teardown_runtime
from ..data.class_names import canonical, match_classes, parse_aliases
from ..data.datasets import FERDataset, Sample, load_splits
from ..data.protocols import relabel_for
from ..data.transforms import test_transform
from ..engine.evaluate import evaluate, format_metrics, write_report
from ..engine.transfer import transfer_metrics
from ..experiment.config import Config
from ..weights.build import build_zero_shot, load_trained, preprocess_from_config

log = logging.getLogger(__name__)


def _out_path(out: str | Path | None) -> Path:
    return Path(out).expanduser() if out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"


def run_eval(
    data_root: str | Path,
    checkpoint: str | Path | None = None,
    zero_shot_config: Config | None = None,
    dataset: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    allow_outside_root: bool = False,
    overrides: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    class_aliases: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate and write metrics.json, predictions.csv, confusion_matrix.{csv,png}; returns the metrics."""
    if (checkpoint is None) == (zero_shot_config is None):
        raise ConfigError("give either a checkpoint or --zero-shot with a backbone")
    check("batch_size", batch_size, POSITIVE_INT)
    rt = setup_runtime(device, precision)
    out_path = _out_path(out)
    try:
        with removed_on_failure(out_path):
            return _evaluate(rt, out_path, overwrite, data_root, checkpoint, zero_shot_config, dataset, split,
                             batch_size, workers, progress, allow_outside_root, overrides, classes, class_aliases)
    finally:
        teardown_runtime(rt)


def _evaluate(rt: Runtime, out_path: Path, overwrite: bool, data_root: str | Path, checkpoint: str | Path | None,
              zero_shot_config: Config | None, dataset: str | None, split: str, batch_size: int, workers: int,
              progress: bool, allow_outside_root: bool, overrides: Sequence[str], classes: Sequence[str] | None,
              class_aliases: Sequence[str] | None) -> dict[str, Any]:
    # the output folder is checked before any model or data is loaded
    out_dir = output_dir(out_path, "--out", must_be_empty=True, overwrite=overwrite) if rt.is_main else None
    if checkpoint is not None:
        loaded = load_trained(checkpoint, overrides)
        model, class_names, pre = loaded.model, loaded.class_names, loaded.preprocess
        dataset = dataset or loaded.meta.get("dataset", "rafdb")
        source = {"checkpoint": str(loaded.path), "stage": loaded.meta["stage"]}
    else:
        cfg = zero_shot_config
        dataset = dataset or cfg.data.dataset
        class_names = None
        source = {"zero_shot": True, "backbone": cfg.backbone.path or cfg.backbone.arch}
    splits = load_splits(dataset, data_root, verify_images=False, allow_outside_root=allow_outside_root)
    if dataset == "folder" and class_names and set(splits.class_names) == set(class_names):
        splits = load_splits(dataset, data_root, classes=class_names, verify_images=False)  # checkpoint's order
    if checkpoint is None:
        class_names = splits.class_names
        built = build_zero_shot(cfg, class_names)
        model, pre = built.model, preprocess_from_config(cfg, built.spec)
    samples = splits.test if split == "test" else splits.train
    transfer: dict[str, Any] = {}
    words = None
    if checkpoint is not None:
        recorded = ((loaded.meta.get("config") or {}).get("data") or {}).get("class_aliases")
        samples, class_names, words, transfer = _match_classes(model, samples, splits.class_names, classes,
                                                               class_aliases if class_aliases is not None else recorded)
    if not samples:
        raise ConfigError(f"{dataset} at {data_root}: the {split} split is empty")
    data = FERDataset(samples, pre.resize(), test_transform(pre), size=pre.image_size)
    model = model.to(rt.device).eval()
    text = None
    if words is not None:
        with torch.no_grad(), rt.autocast():
            text = model.text_features(words)
    metrics, scores = evaluate(model, data, class_names, rt, batch_size, workers, progress, text_features=text)
    if transfer.get("unseen_classes") or transfer.get("mapped"):
        trained_on_base = bool(checkpoint is not None and
                               ((loaded.meta.get("config") or {}).get("data") or {}).get("base_classes"))
        metrics.update(transfer_metrics(scores, data.labels, transfer["seen"], base_to_novel=trained_on_base))
    if rt.is_main:
        extra = {**source, "dataset": dataset, "data_root": str(data_root), "split": split, **transfer}
        write_report(out_dir, data, class_names, scores, metrics, extra=extra)
        log.info("%s %s: %s", dataset, split, format_metrics(metrics))
        for line in transfer.get("class_mapping", []) if transfer.get("mapped") else []:
            log.info("  class %s", line)
        if "base_to_novel" in metrics:
            b2n = metrics["base_to_novel"]
            log.info("base-to-novel: base %s, novel %s, H %s", *(f"{v:.4f}" if v is not None else "-" for v in
                                                                 (b2n["base"], b2n["novel"], b2n["h"])))
        log.info("report written to %s", out_dir)
        metrics["out_dir"] = str(out_dir)
    return metrics


def _match_classes(model: Any, samples: list[Sample], dataset_classes: list[str], classes: Sequence[str] | None,
                   aliases: Sequence[str] | None) -> tuple[list[Sample], list[str], list[str], dict[str, Any]]:
    """Score the dataset's classes (or ``--classes``) with a trained model: classes it was trained for (by name or
    alias) with their trained prompts, the others from their words. Returns the relabelled samples, the target
    classes, their prompt words and what the report says about the matching."""
    trained = list(model.classes.names)
    extra = parse_aliases(aliases)
    if classes is None:
        same = sorted(canonical(c, extra) for c in dataset_classes) == sorted(canonical(c, extra) for c in trained)
        classes = [next(d for d in dataset_classes if canonical(d, extra) == canonical(t, extra)) for t in trained] \
            if same else list(dataset_classes)
    match = match_classes(classes, trained, model.classes.words, aliases, where="--classes")
    kept, left_out = relabel_for(samples, dataset_classes, match.targets, aliases)
    if left_out:
        log.info("classes not among the scored ones, their images left out: %s", ", ".join(left_out))
    mapping = match.describe(trained)
    mapped = not match.identical or len(match.targets) != len(trained) or bool(left_out)
    return kept, list(match.targets), list(match.words), {
        "trained_classes": trained, "class_mapping": mapping, "seen": match.seen, "mapped": mapped,
        "unseen_classes": [t for t, s in zip(match.targets, match.seen) if not s], "left_out_classes": left_out,
        "classes": [{"name": t, "seen": s, "trained_as": trained[i] if i is not None else None}
                    for t, s, i in zip(match.targets, match.seen, match.trained)],
    }
