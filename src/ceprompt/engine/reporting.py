"""What a run tells while it trains: one ``summary.csv`` row and one log line per epoch, an overall progress bar
with the time left, and the same scalars to the experiment trackers named in ``run.log_to``.

Trackers: ``tensorboard`` (``pip install 'ceprompt[tensorboard]'``, the default), ``wandb`` (Weights & Biases;
``WANDB_MODE=offline`` keeps everything in the run directory) and ``mlflow`` (``MLFLOW_TRACKING_URI``, else a
file store in the run directory). Each receives the config as hyper-parameters, the epoch scalars and, at the
end, the chosen epoch's metrics and confusion matrix. A tracker that is not installed costs one line; training
goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ..core.config import dotted
from ..core.extras import TRACKER_INSTALL, installed_trackers
from ..experiment.config import Config
from .evaluate import format_metrics
from .run_dir import SCORES, append_summary

log = logging.getLogger(__name__)


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as ``section.key`` -> value, lists as text (what trackers take as hyper-parameters)."""
    return {name: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
            for name, value in dotted(cfg.to_dict()).items()}


class _TensorBoard:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.params = flat_config(cfg)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in self.params.items()))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def final(self, metrics: dict[str, float], picture: Path | None) -> None:
        if picture is not None and picture.is_file():
            import numpy as np
            from PIL import Image

            self.writer.add_image("confusion_matrix", np.asarray(Image.open(picture).convert("RGB")), dataformats="HWC")
        hparams = {k: ("none" if v is None else v) for k, v in self.params.items()}
        self.writer.add_hparams(hparams, {f"final/{k}": v for k, v in metrics.items()}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="ceprompt", name=run_dir.name, dir=str(run_dir), config=flat_config(cfg),
                              reinit=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def final(self, metrics: dict[str, float], picture: Path | None) -> None:
        extra: dict[str, Any] = {f"final/{k}": v for k, v in metrics.items()}
        if picture is not None and picture.is_file():
            extra["confusion_matrix"] = self.wandb.Image(str(picture))
        self.run.log(extra)
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        # An unreachable server cost minutes of retries before its warning; a few seconds decide here (a value
        # the user set is kept).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a file store in the run: it needs no database library (mlflow 3 asks for this variable to use one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment("ceprompt")
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flat_config(cfg).items()})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def final(self, metrics: dict[str, float], picture: Path | None) -> None:
        self.mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        if picture is not None and picture.is_file():
            self.mlflow.log_artifact(str(picture))

    def close(self) -> None:
        self.mlflow.end_run()


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


def open_trackers(names: Sequence[str], run_dir: Path, cfg: Config) -> list[Any]:
    found = installed_trackers()
    trackers = []
    for name in names:
        if not found[name]:
            log.warning("run.log_to names %s, which is not installed (%s); training goes on without it", name,
                        TRACKER_INSTALL[name])
            continue
        try:
            trackers.append(_Guarded(name, OPENERS[name](run_dir, cfg)))
        except Exception as exc:  # a tracker's own failure (no login, an unreachable server) costs a line, no run
            log.warning("%s could not start (%s); training goes on without it", name, _first_line(exc))
    return trackers


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


class _Guarded:
    """A tracker whose every call is contained: the first failure (a server that accepted the run and then refuses
    its metrics) costs one warning and the tracker, never the training run."""

    def __init__(self, name: str, tracker: Any) -> None:
        self.name, self.tracker, self.failed = name, tracker, False

    def _call(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as exc:
            self.failed = True
            log.warning("%s failed (%s); training goes on without it", self.name, _first_line(exc))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._call("scalars", values, step)

    def final(self, metrics: dict[str, float], picture: Path | None) -> None:
        self._call("final", metrics, picture)

    def close(self) -> None:
        if not self.failed:
            self.tracker.close()


class Reporter:
    """Rank 0's account of a run: summary rows, log lines, the overall bar, the trackers."""

    def __init__(self, cfg: Config, run_dir: Path, selected_on: str, start_epoch: int) -> None:
        self.cfg, self.run_dir, self.selected_on = cfg, run_dir, selected_on  # "test" or "val"
        self.trackers = open_trackers(cfg.run.log_to, run_dir, cfg)
        self.started = time.monotonic()
        self.bar = tqdm(total=cfg.optim.epochs, initial=start_epoch, unit="epoch", desc="run", position=1,
                        disable=not cfg.run.progress, dynamic_ncols=True, leave=False)

    def epoch(self, epoch: int, stats: Any, metrics: dict[str, Any] | None, threads: int, best: tuple[float, int],
              world: int) -> None:
        row = {"epoch": epoch + 1, "lr": f"{stats.lr:.3e}", "train_loss": f"{stats.loss:.6f}",
               "train_ce": f"{stats.ce:.6f}", "train_kd": f"{stats.kd:.6f}",
               "train_accuracy": f"{stats.accuracy:.6f}", "epoch_seconds": f"{stats.seconds:.2f}",
               "train_images_per_second": f"{stats.images_per_second * world:.2f}", "threads": threads}
        split = self.selected_on
        if metrics:
            row.update({f"{split}_{score}": f"{metrics[score]:.6f}" for score in SCORES})
        append_summary(self.run_dir, row, split)
        shown = f"  {split} {format_metrics(metrics)}  best {best[0]:.4f}@{best[1]}" if metrics else ""
        log.info("epoch %d/%d  loss %.4f (ce %.4f kd %.4f)  train acc %.4f  lr %.2e  %.1f img/s  %.0fs%s",
                 epoch + 1, self.cfg.optim.epochs, stats.loss, stats.ce, stats.kd, stats.accuracy, stats.lr,
                 stats.images_per_second * world, stats.seconds, shown)
        values = {f"train/{k}": getattr(stats, k) for k in ("loss", "ce", "kd", "accuracy", "lr")}
        values["train/images_per_second"] = stats.images_per_second * world
        if metrics:
            values.update({f"{split}/{k}": metrics[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1")})
        for tracker in self.trackers:
            tracker.scalars(values, epoch + 1)
        self.bar.update(1)
        if metrics:
            self.bar.set_postfix_str(f"{split} accuracy {metrics['accuracy']:.4f}")

    def final(self, metrics: dict[str, Any], picture: Path | None) -> None:
        summary = {k: metrics[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1")}
        for tracker in self.trackers:
            tracker.final(summary, picture)

    def close(self) -> None:
        self.bar.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # never lose a finished run to a tracker
                log.warning("closing a tracker failed (%s)", str(exc).splitlines()[0][:160])
