"""``ceprompt train``: either stage, on a CPU, one GPU or many (torchrun), with exact resume.

The :class:`Trainer` builds everything a run needs, then trains epoch by epoch, evaluates, saves and reports;
the run directory itself (creation, replacement, resume, log file, ``summary.csv``) is :mod:`.run_dir`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..core.errors import ConfigError, DataError, TrainingError
from ..core.io_utils import atomic_write
from ..core.owned_dirs import MARKER, DirLock
from ..core.runtime import Runtime, epoch_seed, seed_everything, setup_runtime, teardown_runtime, usable_workers
from ..data.datasets import (
    FERDataset,
    Sample,
    default_augment,
    default_balanced,
)
from ..data.samplers import TrainSampler
from ..data.transforms import test_transform, train_augment
from ..experiment.config import Config, dump_config, load_config
from ..model.stage import Stage, TrainBatch
from ..model.towers import compiled_block_forward
from ..model.trainable import load_trainable
from ..weights.build import BuiltModel, build_for_training, check_init, checkpoint_meta, preprocess_from_config
from ..weights.checkpoint import load_resume, read_checkpoint, save_checkpoint, save_resume
from .evaluate import eval_loader, evaluate, format_metrics, reraise_worker_error, unwrap, write_report
from .metrics import fit_temperature
from .reporting import Reporter
from .run_data import load_data
from .run_dir import (
    attach_log_file,
    check_free_space,
    keep_best,
    on_rank0,
    plan_run,
    remove_stale_temporaries,
    rt_gather_path,
    settle_kept_best,
    truncate_summary,
)
from .schedule import apply_lr, lr_at
from .threads import ThreadGovernor

log = logging.getLogger(__name__)


def make_optimizer(cfg: Config, model: Stage) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = model.param_groups(o.lr, o.weight_decay, o.layer_decay)
    if o.name == "adamw":
        # The fused kernel updates in place: no foreach temporaries the size of the trainable weights.
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


@dataclass
class EpochStats:
    loss: float
    ce: float
    kd: float
    accuracy: float
    lr: float
    seconds: float
    images_per_second: float


class Trainer:
    """Everything a run needs, built (and so validated) before its directory is touched; then
    :meth:`attach` binds it to the run directory and :meth:`fit` trains."""

    def __init__(self, cfg: Config, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.run_dir = Path()
        self.threads = ThreadGovernor(cfg.run.threads or None, adapt=not cfg.run.deterministic)
        self.splits = load_data(cfg, rt)
        self.class_names = self.splits.class_names
        self.built: BuiltModel = build_for_training(cfg, self.class_names)
        self.model = self.built.model.to(rt.device)
        self.preprocess = preprocess_from_config(cfg, self.built.spec)
        d = cfg.data
        resize = self.preprocess.resize()
        augment = train_augment(d.augment or default_augment(d.dataset), self.preprocess)
        held_out = self.splits.val
        size = self.preprocess.image_size
        self.train_set = FERDataset(self.splits.train, resize, augment, cache=d.cache_images, workers=d.workers,
                                    size=size)
        self.test_set = FERDataset(self.splits.test, resize, test_transform(self.preprocess), cache=d.cache_images,
                                   size=size, workers=d.workers)
        # the split that chooses the best epoch and the temperature: a validation split carved from the training
        # images when data.val_fraction is set, else the test split (the paper's protocol)
        self.val_set = FERDataset(held_out, resize, test_transform(self.preprocess), size=size) if held_out else None
        self.selected_on = "val" if held_out else "test"
        if not len(self.train_set) or not len(self.test_set):
            split = "training" if not len(self.train_set) else "test"
            raise DataError(f"dataset {d.dataset} at {d.root}: no {split} images (training evaluates on the test "
                            "split every epoch and keeps its best epoch)")
        o = cfg.optim
        self.micro_batch = o.batch_size // (rt.world * o.accum_steps)
        if self.micro_batch * rt.world * o.accum_steps != o.batch_size:
            raise ConfigError(f"optim.batch_size={o.batch_size} is not divisible by {rt.world} process(es) x "
                              f"optim.accum_steps={o.accum_steps}")
        balanced = d.balanced_sampler if d.balanced_sampler is not None else default_balanced(d.dataset)
        self.sampler = TrainSampler(self.train_set.labels, balanced, rt.world, rt.rank, cfg.run.seed)
        self.generator = torch.Generator()
        # Loader processes live for the whole run: each image's augmentation is seeded by its draw (the sampler),
        # not by the process, so this changes no batch. Restarting them every epoch cost seconds an epoch (their
        # start, and copy-on-write faults in this process while forked children shared its memory).
        n_workers = usable_workers(d.workers)
        self.loader = DataLoader(self.train_set, batch_size=self.micro_batch, sampler=self.sampler,
                                 num_workers=n_workers, pin_memory=rt.device.type == "cuda",
                                 generator=self.generator, persistent_workers=n_workers > 0)
        self.select_set = self.val_set or self.test_set
        self.select_loader = eval_loader(self.select_set, rt, self.micro_batch, d.workers, persistent=True)
        self.model.start_training(len(self.train_set))
        if cfg.run.compile:
            compile_blocks(self.model)
        self.optimizer = make_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
        self.net: nn.Module = self.model
        if rt.distributed:
            # The teacher cache buffers are each process's own: they must never be synced, at init or later.
            # torch deprecates broadcast_buffers but keeps it for exactly this (its forward_sync_buffers=False
            # still syncs at init), and warns every process about it: a warning that asks nothing of the user.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                self.net = DistributedDataParallel(self.model, device_ids=[rt.device.index]
                                                   if rt.device.type == "cuda" else None, broadcast_buffers=False)
        self.steps_per_epoch = math.ceil(len(self.loader) / o.accum_steps)
        self.total_steps = self.steps_per_epoch * o.epochs
        self.warmup_steps = round(o.warmup_epochs * self.steps_per_epoch)
        self.start_epoch, self.best_accuracy, self.best_epoch = 0, -1.0, -1
        self.kept_best: Path | None = None  # a resumed run's previous best, for the runs built on it
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.reporter: Reporter | None = None
        self.on_checkpoint: Callable[[], None] = lambda: None

    def close(self) -> None:
        """End the loader processes now (they live as long as their loaders), not whenever memory is collected."""
        self.loader = self.select_loader = None  # type: ignore[assignment]
        if self.reporter is not None:
            self.reporter.close()

    def attach(self, run_dir: Path, resuming: bool) -> None:
        """Bind to the (created or resumed) run directory: space check, logs, restored state."""
        self.run_dir = run_dir
        cfg, rt, o = self.cfg, self.rt, self.cfg.optim
        if rt.is_main:
            trainable = sum(p.numel() for p in self.trainable)
            check_free_space(run_dir, trainable, 2 if o.name == "adamw" else 1)
            self.reporter = Reporter(cfg, run_dir, self.selected_on, 0)
            if self.val_set is not None:
                self._record_validation_split(resuming)
            if cfg.data.shots:
                self._record_list("train_images.txt", self.train_set.samples, resuming, "few-shot training images")
            log.info("%d training / %d test images, classes %s", len(self.train_set), len(self.test_set),
                     self.class_names)
            log.info("stage %s, %s trainable parameters, micro-batch %d x %d process(es) x %d accumulation, "
                     "%s on %s, %d thread(s)", cfg.stage, f"{trainable:,}", self.micro_batch, rt.world,
                     o.accum_steps, rt.precision, rt.device, torch.get_num_threads())
            if self.splits.skipped:
                (run_dir / "skipped_images.txt").write_text("\n".join(self.splits.skipped) + "\n")
        if resuming:
            self._restore()

    def _record_validation_split(self, resuming: bool) -> None:
        self._record_list("val_images.txt", self.val_set.samples, resuming, "validation split")

    def _record_list(self, name: str, samples: Sequence[Sample], resuming: bool, what: str) -> None:
        """Images drawn for this run (label and path per line), listed in the run; a resumed run must draw the
        same ones."""
        listed = self.run_dir / name
        text = "".join(f"{self.class_names[s.label]} {s.path}\n" for s in samples)
        if resuming and listed.is_file() and listed.read_text() != text:
            raise ConfigError(f"{listed}: the {what} drawn now differs from the one this run trained with "
                              "(the dataset or the data settings changed)")
        with atomic_write(listed) as tmp:
            tmp.write_text(text)

    def _restore(self) -> None:
        state = self.rt.from_main(lambda: load_resume(self.run_dir))  # read by rank 0, sent to the others
        saved, now = state.get("model_config", {}), model_settings(self.cfg)
        changed = [f"{k}={saved[k]!r} in the saved state, {now.get(k)!r} now" for k in sorted(saved)
                   if saved[k] != now.get(k)]
        if changed:
            raise ConfigError(f"{self.run_dir / 'resume.pt'}: the model differs from the one being resumed: "
                              + "; ".join(changed))
        saved_optim = state.get("optimizer_name", self.cfg.optim.name)
        if saved_optim != self.cfg.optim.name:
            raise ConfigError(f"{self.run_dir / 'resume.pt'}: optim.name={saved_optim!r} in the saved state, "
                              f"{self.cfg.optim.name!r} now; a resumed run keeps its optimiser")
        load_trainable(self.model, state["model"], str(self.run_dir / "resume.pt"))
        saved_caches = state.get("teacher_cache") or {}
        ranks = saved_caches.get("ranks") if isinstance(saved_caches.get("ranks"), list) else [saved_caches]
        # this process's own cache when the run had as many processes, else none (computed again)
        self.model.load_extra_state(ranks[self.rt.rank] if len(ranks) == self.rt.world else {})
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"{self.run_dir / 'resume.pt'}: the saved optimiser state does not fit this run "
                              f"({str(exc).splitlines()[0][:160]})") from None
        if state["epoch"] > self.cfg.optim.epochs:
            raise ConfigError(f"{self.run_dir / 'resume.pt'}: saved after epoch {state['epoch']}, but this run has "
                              f"optim.epochs={self.cfg.optim.epochs}; resume with --set optim.epochs=N, N >= "
                              f"{state['epoch']}")
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"]
        if self.rt.is_main:
            self.kept_best = keep_best(self.run_dir)
        self.best_accuracy, self.best_epoch = float(state["best_accuracy"]), state["best_epoch"]
        if self.rt.is_main:
            truncate_summary(self.run_dir, self.start_epoch, self.selected_on)
        log.info("resumed %s after epoch %d (best test accuracy %.4f at epoch %d)", self.run_dir,
                 self.start_epoch, self.best_accuracy, self.best_epoch)

    def _seed_epoch(self, epoch: int) -> None:
        seed = epoch_seed(self.cfg.run.seed, self.rt.rank, epoch)
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def train_epoch(self, epoch: int) -> EpochStats:
        rt, o = self.rt, self.cfg.optim
        self.net.train()
        self._seed_epoch(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(self.loader)
        # Kept on the device and read once per optimiser step (the finiteness flags) and once per epoch (the sums):
        # every read waits for the device's queue to drain (benchmarks/step_syncs.py counts them).
        sums = torch.zeros(5, dtype=torch.float64, device=rt.device)  # loss, ce, kd (sample-weighted), correct, seen
        bad_loss = torch.zeros((), dtype=torch.bool, device=rt.device)
        seen_here = 0
        lr = 0.0
        bar = tqdm(total=n_batches, disable=not (self.cfg.run.progress and rt.is_main), unit="batch",
                   desc=f"epoch {epoch + 1}/{o.epochs}", dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        try:
            for i, batch in enumerate(self.loader):
                step = epoch * self.steps_per_epoch + i // o.accum_steps
                if i % o.accum_steps == 0:
                    lr = lr_at(step, self.total_steps, self.warmup_steps, o.lr, o.min_lr)
                    apply_lr(self.optimizer, lr)
                    group_start = i
                group_size = min(o.accum_steps, n_batches - group_start)
                last_micro = i - group_start == group_size - 1
                sync = contextlib.nullcontext() if last_micro or not rt.distributed else self.net.no_sync()
                labels = batch["label"].to(rt.device, non_blocking=True)
                inputs = TrainBatch(batch["image"].to(rt.device, non_blocking=True), labels, batch["index"],
                                    batch["flip"])
                with sync:
                    with rt.autocast():
                        out = self.net(inputs)
                    bad_loss |= ~torch.isfinite(out.loss.detach())
                    self.scaler.scale(out.loss / group_size).backward()
                if last_micro:
                    if o.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self._check_step(bad_loss, epoch, i)
                n = len(labels)
                seen_here += n
                kd = out.parts.get("kd")
                sums += torch.stack([out.loss.detach().double() * n, out.parts["ce"].detach().double() * n,
                                     (kd.detach().double() if kd is not None else sums.new_zeros(())) * n,
                                     (out.logits.detach().argmax(1) == labels).sum().double(),
                                     sums.new_tensor(float(n))])
                bar.update(1)
                if bar.n % 25 == 0 or bar.n == n_batches:  # the loss shown costs a read: not every batch
                    bar.set_postfix_str(f"loss {(sums[0] / sums[4]).item():.4f} "
                                        f"{seen_here * rt.world / (time.perf_counter() - start):.1f} img/s")
        except DataError as exc:
            reraise_worker_error(exc)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        loss, ce, kd, correct, seen = rt.sum(sums.tolist())
        return EpochStats(loss / seen, ce / seen, kd / seen, correct / seen, lr, seconds, seen / seconds)

    def _check_step(self, bad_loss: torch.Tensor, epoch: int, batch: int) -> None:
        """After each optimiser step, one read (and one all-reduce under torchrun): a non-finite loss in the step's
        micro-batches, or a step that made any weight inf or NaN, stops the run before anything is saved."""
        norms = torch._foreach_norm(self.trainable)  # one multi-tensor kernel on a GPU, not one check per tensor
        bad_weights = ~torch.isfinite(torch.stack(norms)).all()
        flags = torch.stack([bad_loss, bad_weights]).double()
        if self.rt.distributed:
            flags = torch.tensor(self.rt.sum(flags.tolist()))
        loss_flag, weight_flag = flags.tolist()
        bad_loss.zero_()
        where = (f"epoch {epoch + 1}, batch {batch + 1} (optimiser step "
                 f"{epoch * self.steps_per_epoch + batch // self.cfg.optim.accum_steps})")
        kept = f"nothing was saved over the last good checkpoint in {self.run_dir / 'checkpoints'}"
        if loss_flag:
            raise TrainingError(f"non-finite loss at {where}; {kept}. Try a lower optim.lr or run.precision=fp32")
        if weight_flag:
            raise TrainingError(f"non-finite weights after {where}; {kept}. Try a lower optim.lr, optim.grad_clip "
                                "or run.precision=fp32")

    def _meta(self, epoch: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
        summary = None
        if metrics:
            summary = {k: metrics[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1", "n")}
        return checkpoint_meta(self.cfg, self.built, self.class_names, self.preprocess,
                               folder=self.run_dir / "checkpoints", epoch=epoch,
                               test_metrics=summary if self.selected_on == "test" else None)

    def _save(self, epoch: int, metrics: dict[str, Any] | None, teacher_states: list[Any]) -> None:
        config_text = dump_config(self.cfg)
        if (self.run_dir / "config.yaml").read_text() != config_text:  # resumed with --set overrides
            with atomic_write(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(config_text)
            log.info("config.yaml updated with this run's overrides")
        weights = unwrap(self.model).trainable_state_dict()
        ckpt = self.run_dir / "checkpoints"
        meta = self._meta(epoch + 1, metrics)
        if metrics and metrics["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_epoch = metrics["accuracy"], epoch + 1
            save_checkpoint(ckpt / "best.safetensors", weights, meta)
        save_checkpoint(ckpt / "last.safetensors", weights, meta)
        save_resume(self.run_dir, {
            "epoch": epoch + 1, "model": weights, "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.cfg.optim.name,
            "scaler": self.scaler.state_dict(), "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
            "model_config": model_settings(self.cfg),
            # each process's own (they saw different images): a resumed run continues exactly, per process
            "teacher_cache": {"ranks": teacher_states},
        })

    def fit(self) -> Path:
        try:
            self._epochs()
        finally:  # a failed run leaves best.safetensors as it was: its kept copy is then not needed
            if self.rt.is_main:
                settle_kept_best(self.run_dir, self.kept_best)
        return self.run_dir

    def _epochs(self) -> None:
        cfg, rt = self.cfg, self.rt
        epochs = cfg.optim.epochs
        for epoch in range(self.start_epoch, epochs):
            self.threads.recheck()
            stats = self.train_epoch(epoch)
            metrics = None
            if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == epochs:
                metrics, _ = evaluate(self.net, self.select_set, self.class_names, rt, self.micro_batch,
                                      cfg.data.workers, cfg.run.progress, loader=self.select_loader)
            teacher_states = rt.gather_to_main(self.model.extra_state())
            if rt.is_main:
                self._save(epoch, metrics, teacher_states)
                self.on_checkpoint()
                self.reporter.epoch(epoch, stats, metrics, self.threads.threads, (self.best_accuracy, self.best_epoch),
                                    rt.world)
            rt.barrier()
        if cfg.run.final_eval:
            self.final_eval()

    def final_eval(self) -> None:
        """Full report of the chosen checkpoint on the test split, in ``eval/``: evaluated once, here, when a
        validation split chose the epoch; the temperature is fitted on the split that chose it."""
        best = self.run_dir / "checkpoints" / "best.safetensors"
        chosen = rt_gather_path(self.rt, best if best.is_file() else self.run_dir / "checkpoints" / "last.safetensors")
        tensors, meta, _ = self.rt.from_main(lambda: read_checkpoint(chosen))  # rank 0 wrote it; no shared storage
        load_trainable(self.model, tensors, str(chosen))
        d, rt = self.cfg.data, self.rt
        selection, held_out = None, None
        if self.val_set is not None:
            selection, held_out = evaluate(self.net, self.val_set, self.class_names, rt, self.micro_batch, d.workers,
                                           self.cfg.run.progress, loader=self.select_loader)
        metrics, scores = evaluate(self.net, self.test_set, self.class_names, rt, self.micro_batch, d.workers,
                                   self.cfg.run.progress)
        if rt.is_main:
            fit_scores, fit_set = (held_out, self.val_set) if self.val_set is not None else (scores, self.test_set)
            calibration = {**fit_temperature(fit_scores, fit_set.labels),
                           "fit_on": "validation split" if self.val_set is not None else "test split"}
            summary = {k: metrics[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1", "n")}
            save_checkpoint(chosen, tensors, {**meta, "calibration": calibration, "test_metrics": summary})
            chose = ("the validation split (data.val_fraction); the test split evaluated once, for this epoch"
                     if self.val_set is not None else "the test split (the paper's protocol)")
            write_report(self.run_dir / "eval", self.test_set, self.class_names, scores, metrics,
                         extra={"checkpoint": str(chosen), "epoch": meta.get("epoch"), "stage": self.cfg.stage,
                                "calibration": calibration, "epoch_chosen_on": chose,
                                "validation": selection and {k: selection[k] for k in summary}})
            log.info("best checkpoint (epoch %s, chosen on %s): %s", meta.get("epoch"), chose, format_metrics(metrics))
            log.info("probability temperature %.2f (NLL %.3f, %.3f at 1, fitted on the %s)", calibration["temperature"],
                     calibration["nll"], calibration["nll_at_1"], calibration["fit_on"])
            if self.reporter is not None:
                self.reporter.final(metrics, self.run_dir / "eval" / "confusion_matrix.png")


def compile_blocks(model: Stage) -> None:
    """Run the model's transformer blocks through ``torch.compile``.

    One compiled block serves every block, but a run needs a graph per tower width, grad mode and batch
    shape (student, teacher, text tower, evaluation): more than dynamo's default of 8, after which it
    would silently fall back to eager."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    model.set_block_pass(compiled_block_forward())


def model_settings(cfg: Config) -> dict[str, Any]:
    """The config values that shape the trained weights; a resume must not change them."""
    flat = {"stage": cfg.stage, "data.dataset": cfg.data.dataset, "backbone.path": cfg.backbone.path,
            "backbone.arch": cfg.backbone.arch, "data.val_fraction": cfg.data.val_fraction}
    flat.update({f"head.{k}": v for k, v in cfg.head.__dict__.items()})
    flat.update({f"{cfg.stage}.{k}": v for k, v in cfg.stage_settings.__dict__.items()})
    return flat


def training_config(config: str | Path | None, resume: str | Path | None, overrides: Sequence[str] = (),
                    values: Mapping[str, Any] | None = None) -> Config:
    """The config of a run to start (``config``: a YAML file or a shipped name) or to resume (its own
    ``config.yaml``), with ``KEY=VALUE`` text overrides and then typed ``values`` (dotted keys); what ``ceprompt
    train`` and ``ceprompt.train`` both use."""
    if resume is not None:
        if config:
            raise ConfigError("--resume continues a run with its own config.yaml; do not pass --config")
        saved = Path(resume).expanduser() / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{saved}: not found; --resume takes a run directory made by ceprompt train")
        return load_config(saved, overrides, values)  # the trainer records changes once an epoch succeeds
    if not config:
        raise ConfigError("give --config (a YAML file or a shipped name such as rafdb_stage1)")
    return load_config(config, overrides, values)


def train(cfg: Config, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run (or continue) a training run; returns its directory.

    Everything is validated (config, data, backbone, stage-1 checkpoint) before the run directory is
    created or replaced; a replaced run disappears only once the new one has saved a checkpoint.
    """
    if resume is None:
        check_init(cfg)  # a missing stage-1 run is said before the data is read
    rt = setup_runtime(cfg.run.device, cfg.run.precision, cfg.run.deterministic)
    handler, owned, lock, trainer = None, None, None, None
    try:
        seed_everything(cfg.run.seed + rt.rank)
        owned, run_dir = plan_run(cfg, rt, resume, overwrite)
        if resume is not None:
            lock = on_rank0(rt, lambda: DirLock(run_dir).acquire())
        trainer = Trainer(cfg, rt)
        if owned is not None:
            run_dir = Path(rt.gather(str(on_rank0(rt, owned.open)))[0])
            trainer.on_checkpoint = owned.commit
        if rt.is_main:
            if resume is not None:
                remove_stale_temporaries(run_dir)
                (run_dir / MARKER).touch()
            handler = attach_log_file(run_dir)
            if resume is None:
                with atomic_write(run_dir / "config.yaml") as tmp:
                    tmp.write_text(dump_config(cfg))
            log.info("run directory %s", run_dir)
        if not rt.is_main:
            logging.getLogger("ceprompt").setLevel(logging.WARNING)
        trainer.attach(run_dir, resuming=resume is not None)
        return trainer.fit()
    except BaseException as exc:
        if handler is not None:
            log.error("training stopped: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if owned is not None and rt.is_main:
            owned.rollback()
        raise
    finally:
        if handler is not None:
            logging.getLogger("ceprompt").removeHandler(handler)
            handler.close()
        if owned is not None:
            owned.close()
        if lock is not None:
            lock.release()
        if trainer is not None:
            trainer.close()
        teardown_runtime(rt)
