"""A training run's folder: where it is, whether it may be created, replaced or resumed, its log file and
its per-epoch ``summary.csv``.

A run directory holds ``config.yaml`` (resolved), ``train.log``, ``summary.csv`` (one row per
epoch), ``tensorboard/`` (when tensorboard is installed), ``checkpoints/{last,best}.safetensors``
with JSON sidecars, ``resume.pt`` and, at the end, ``eval/`` (the best checkpoint's full report).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import CepromptError, ConfigError
from ..core.io_utils import atomic_write, verified_sha256
from ..core.owned_dirs import OwnedDir
from ..core.paths import escapes
from ..core.runtime import Runtime
from ..experiment.config import Config
from ..weights.checkpoint import RESUME_NAME, kept_copy

log = logging.getLogger(__name__)
SCORES = ("accuracy", "mean_class_accuracy", "macro_f1")


def summary_fields(split: str) -> list[str]:
    """``summary.csv``'s columns: the scores of the split that selects the best epoch ("test", or "val" with
    data.val_fraction) and no empty columns for the other."""
    return (["epoch", "lr", "train_loss", "train_ce", "train_kd", "train_accuracy"]
            + [f"{split}_{score}" for score in SCORES]
            + ["epoch_seconds", "train_images_per_second", "threads"])


def run_dir_path(cfg: Config, rt: Runtime) -> Path:
    """``run.output_dir / run.name`` (name chosen by rank 0 when not given)."""
    name = cfg.run.name or f"{cfg.data.dataset}-{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = rt.gather(name)[0]
    if escapes(name) or Path(name).name != name:
        raise ConfigError(f"run.name={name!r}: expected a plain folder name (no '/', '..' or absolute path); "
                          "use run.output_dir (--output-dir) for the parent folder")
    return Path(cfg.run.output_dir).expanduser() / name


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / RESUME_NAME).is_file() or any((run_dir / "checkpoints").glob("*.safetensors"))


def on_rank0(rt: Runtime, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 only; a CepromptError there is raised on every rank."""
    error, value = None, None
    if rt.is_main:
        try:
            value = action()
        except CepromptError as exc:
            error = exc
    errors = [e for e in rt.gather(None if error is None else (type(error), str(error))) if e]
    if errors:
        kind, message = errors[0]
        raise kind(message)
    return value


def check_free_space(run_dir: Path, trainable: int, optimizer_copies: int) -> None:
    """Two checkpoints plus resume state (weights + optimizer moments) must fit before training starts."""
    need = trainable * 4 * (2 + 1 + optimizer_copies) + (64 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"{run_dir}: only {free / 2**20:.0f} MiB free; checkpoints need about "
                          f"{need / 2**20:.0f} MiB")


def remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written files left by a process killed during a write (the real files are intact)."""
    for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink()


def rt_gather_path(rt: Runtime, path: Path) -> Path:
    return Path(rt.gather(str(path))[0])


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ceprompt").addHandler(handler)
    logging.getLogger("ceprompt").setLevel(logging.INFO)
    return handler


def plan_run(cfg: Config, rt: Runtime, resume: str | Path | None, overwrite: bool) -> tuple[OwnedDir | None, Path]:
    """Check the run directory before anything is built: a resumable run, or one that may be (re)created."""
    if resume is not None:
        run_dir = Path(resume).expanduser()

        def check_resumable() -> None:
            if not has_checkpoint(run_dir):
                raise ConfigError(f"{run_dir}: nothing to resume: the run stopped before its first epoch ended; "
                                  "start it again with the same command without --resume")
        on_rank0(rt, check_resumable)
        return None, run_dir
    path = run_dir_path(cfg, rt)
    protected = [cfg.data.root, cfg.backbone.path, cfg.backbone.init]
    owned = OwnedDir(path, "run directory", has_checkpoint, overwrite, protected,
                     elsewhere="choose another name with --name (or another parent with --output-dir)")
    on_rank0(rt, owned.plan)
    return owned, path


def write_summary(run_dir: Path, rows: list[dict[str, Any]], split: str) -> None:
    fields = summary_fields(split)
    with atomic_write(run_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_summary(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def append_summary(run_dir: Path, row: dict[str, Any], split: str) -> None:
    write_summary(run_dir, read_summary(run_dir) + [row], split)


def truncate_summary(run_dir: Path, epochs_done: int, split: str) -> None:
    """Drop rows of an epoch whose state was never saved (killed between the two writes)."""
    rows = read_summary(run_dir)
    if rows or (run_dir / "summary.csv").is_file():
        write_summary(run_dir, [r for r in rows if int(r["epoch"]) <= epochs_done], split)


def keep_best(run_dir: Path) -> Path | None:
    """Before a resumed run can replace ``checkpoints/best.safetensors`` (a better epoch, a new temperature),
    link the current file under its hash: stage-2 runs built on it record that hash and find the copy."""
    best = run_dir / "checkpoints" / "best.safetensors"
    if not best.is_file():
        return None
    kept = kept_copy(best, verified_sha256(best))
    if not kept.exists():
        try:
            os.link(best, kept)  # no copy of the data: the replacement gets a new file, this one stays
        except OSError:
            shutil.copy2(best, kept)
    return kept


def settle_kept_best(run_dir: Path, kept: Path | None) -> None:
    """After the resumed run: drop the copy when ``best.safetensors`` is still that file, else say where it is."""
    best = run_dir / "checkpoints" / "best.safetensors"
    if kept is None or not kept.is_file():
        return
    if best.is_file() and kept_copy(best, verified_sha256(best)) == kept:
        kept.unlink()
        return
    log.info("best.safetensors changed; the previous one is kept as %s, so runs built on it still load", kept)
