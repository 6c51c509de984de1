"""Evaluation: scores for a whole dataset (sharded over processes), metrics and report files."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..core.errors import DataError
from ..core.io_utils import atomic_write, spreadsheet_safe
from ..core.runtime import Runtime, usable_workers
from ..data.datasets import FERDataset
from ..data.samplers import ShardSampler
from .metrics import classification_metrics
from .plots import plot_confusion

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def reraise_worker_error(exc: Exception) -> None:
    """A DataError raised in a loader process arrives wrapped in a traceback; keep its own message."""
    if isinstance(exc, DataError):
        last = str(exc).strip().splitlines()[-1]
        prefix = "ceprompt.core.errors.DataError: "
        raise DataError(last[len(prefix):] if last.startswith(prefix) else last) from None
    raise exc


def eval_loader(dataset: FERDataset, rt: Runtime, batch_size: int, workers: int, persistent: bool = False) -> DataLoader:
    """This process's share of ``dataset``, in order. ``persistent``: the loader processes live as long as the
    loader (a trainer evaluates every epoch; starting them again each time costs seconds)."""
    n_workers = usable_workers(workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rt.world, rt.rank, batch_size),
                      num_workers=n_workers, pin_memory=rt.device.type == "cuda",
                      persistent_workers=persistent and n_workers > 0)


@torch.no_grad()
def dataset_scores(model: nn.Module, dataset: FERDataset, rt: Runtime, batch_size: int, workers: int,
                   progress: bool = True, desc: str = "eval", loader: DataLoader | None = None,
                   text_features: torch.Tensor | None = None) -> np.ndarray:
    """Head scores (n, C) for every sample, in dataset order, on every process.

    The class text embeddings (``text_features``, default the model's trained classes') are computed once for the
    whole pass, not per batch.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    loader = loader or eval_loader(dataset, rt, batch_size, workers)
    if text_features is None:
        with rt.autocast():
            text = net.class_text_features()
    else:
        text = text_features.to(rt.device)
    indices, scores = [], []
    bar = tqdm(total=len(loader.sampler), disable=not (progress and rt.is_main), desc=desc, unit="img",
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    try:
        for batch in loader:
            with rt.autocast():
                out = net(batch["image"].to(rt.device, non_blocking=True), text_features=text)
            scores.append(out.logits.float().cpu())
            indices.append(batch["index"])
            bar.update(len(batch["index"]))
            bar.set_postfix_str(f"{bar.n / (time.perf_counter() - start):.1f} img/s")
    except DataError as exc:
        reraise_worker_error(exc)
    finally:
        bar.close()
    net.train(was_training)
    n_classes = text.shape[0]
    local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
             torch.cat(scores) if scores else torch.zeros(0, n_classes))
    all_idx, all_scores = zip(*rt.gather(local))
    order = torch.cat(all_idx)
    full = torch.zeros(len(dataset), n_classes)
    full[order] = torch.cat(all_scores)
    return full.numpy()


def evaluate(model: nn.Module, dataset: FERDataset, class_names: Sequence[str], rt: Runtime, batch_size: int,
             workers: int, progress: bool = True, loader: DataLoader | None = None,
             text_features: torch.Tensor | None = None) -> tuple[dict[str, Any], np.ndarray]:
    scores = dataset_scores(model, dataset, rt, batch_size, workers, progress, loader=loader,
                            text_features=text_features)
    y_true = np.array(dataset.labels, dtype=np.int64)
    metrics = classification_metrics(y_true, scores.argmax(axis=1), class_names)
    return metrics, scores


def write_report(out_dir: Path, dataset: FERDataset, class_names: Sequence[str], scores: np.ndarray,
                 metrics: dict[str, Any], title: str = "", extra: dict[str, Any] | None = None) -> Path:
    """metrics.json, predictions.csv, confusion_matrix.csv and confusion_matrix.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "predicted", *[spreadsheet_safe(f"score_{c}") for c in class_names]])
        for sample, row in zip(dataset.samples, scores):
            writer.writerow([spreadsheet_safe(sample.path), spreadsheet_safe(class_names[sample.label]),
                             spreadsheet_safe(class_names[int(row.argmax())]),
                             *[f"{v:.6f}" for v in row]])
    with atomic_write(out_dir / "confusion_matrix.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *map(spreadsheet_safe, class_names)])
        for name, row in zip(class_names, metrics["confusion_matrix"]):
            writer.writerow([spreadsheet_safe(name), *row])
    with atomic_write(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps({**(extra or {}), **metrics}, indent=2) + "\n")
    plot_confusion(metrics["confusion_matrix"], class_names, out_dir / "confusion_matrix.png",
                   title=title or f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
    return out_dir


def format_metrics(metrics: dict[str, Any]) -> str:
    return (f"accuracy {metrics['accuracy']:.4f}  mean class accuracy {metrics['mean_class_accuracy']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  (n={metrics['n']})")
