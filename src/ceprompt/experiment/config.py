"""One config object for a run: the sections, composed, built from a YAML file, ``--set`` text and typed values.

The method's own sections live with what they configure (``head`` in :mod:`ceprompt.model.head`, ``eva`` and
``cat`` beside their stages); this module adds what a run needs around them (backbone, data, optimiser, run) and
the ``compat`` mode. Defaults are the paper's stage-1 RAF-DB settings (docs/method.md sections 2-4); the shipped
YAML files in ``configs/`` state every value that differs per dataset and stage. The resolved config is written
into each run directory and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..core.config import apply_values, check_fields, merge, parse_override, read_yaml, setting
from ..core.errors import ConfigError, brief
from ..core.extras import TRACKERS
from ..core.ranges import POSITIVE, UNIT, Range
from ..data.datasets import DATASET_NAMES
from ..data.transforms import AUGMENTATIONS
from ..model.cat import CatConfig
from ..model.eva import EvaConfig
from ..model.head import HeadConfig
from ..model.stages import STAGES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COMPAT_MODES = ("none", "authors")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The words the authors' code puts in its prompts, per dataset (docs/authors-checkpoints.md). "disgusted" is
# one BPE token where "disgust" is two, which moves the end token. The authors have no AffectNet-8 or
# FERPlus table; ceprompt uses the same words there, with "contempt" for the eighth class.
AUTHORS_PROMPT_NAMES = {
    "rafdb": ["surprise", "fear", "disgusted", "happy", "sad", "anger", "neutral"],
    "affectnet7": ["neutral", "happy", "sad", "surprise", "fear", "disgusted", "anger"],
    "affectnet8": ["neutral", "happy", "sad", "surprise", "fear", "disgusted", "anger", "contempt"],
    "ferplus": ["neutral", "happy", "surprise", "sad", "anger", "disgusted", "fear", "contempt"],
}
# The authors' test-time resize per dataset: (resize, interpolation). Ours is square bicubic everywhere.
AUTHORS_RESIZE = {"rafdb": ("shorter", "bicubic"), "ferplus": ("shorter", "bicubic"),
                  "affectnet7": ("square", "bilinear"), "affectnet8": ("square", "bilinear")}
CONFIG_DIR = Path(__file__).parents[1] / "configs"
SEED = Range(0, 2**32 - 1, integer=True)
EPOCHS = Range(1, 100_000, integer=True)
log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    path: str | None = None  # the user's CLIP weights (any format ceprompt reads)
    arch: str | None = None  # without `path`: random weights of this named architecture (tests, benchmarks)
    seed: int = setting(0, accepts=SEED)  # seed of the random weights when `path` is None
    activation: str = setting("auto", choices=("auto", "quickgelu", "gelu"))  # auto (from the file; QuickGELU for
    #   plain state dicts), quickgelu or gelu
    init: str | None = None  # stage 2: the stage-1 checkpoint (.safetensors file or run directory)
    description: str | None = None  # what the CLIP weights are, for the model card (None: their name or arch)


@dataclass
class DataConfig:
    dataset: str = setting("rafdb", choices=DATASET_NAMES)  # rafdb, affectnet7, affectnet8, ferplus or folder
    root: str | None = None  # dataset root folder, laid out as docs/method.md section 4 / README describe
    image_dir: str | None = None  # rafdb: image folder under root (default Image/aligned_224, else Image/aligned)
    classes: list[str] | None = None  # folder datasets: class order (default: sorted folder names)
    description: str | None = None  # what the training images are, for the model card (None: the dataset named by
    #   data.dataset itself)
    prompt_names: list[str] | None = None  # words for the classes in prompts (None: the class names; compat
    #   authors: the authors' words, e.g. "disgusted"); labels shown to users stay the class names
    resize: str | None = setting(None, choices=("square", "shorter"))  # square (resize to size x size) or shorter
    #   (shorter side, centre crop); None: auto
    interpolation: str | None = setting(None, choices=("bicubic", "bilinear"))  # bicubic or bilinear; None: bicubic
    #   (compat authors: theirs per dataset)
    mean: list[float] = setting(factory=lambda: list(IMAGENET_MEAN), accepts=Range(-10, 10))  # normalisation,
    #   stored with checkpoints
    std: list[float] = setting(factory=lambda: list(IMAGENET_STD), accepts=Range(0, 10, lo_open=True))  # per
    #   channel, as mean
    augment: str | None = setting(None, choices=AUGMENTATIONS)  # rafdb (resize + flip), affectnet (+ affine,
    #   erasing) or none; None: dataset's own
    balanced_sampler: bool | None = None  # draw classes equally (1/count weights); None: dataset's own (AffectNet)
    workers: int = setting(4, accepts=Range(0, 256, integer=True))  # data loading processes per GPU/process
    verify_images: bool = True  # open every image header before training; unreadable files are errors
    skip_bad_images: bool = False  # decode every image first; leave unreadable ones out (listed in the run)
    allow_outside_root: bool = False  # accept index paths that are absolute or leave the root through ../
    cache_images: bool = False  # keep decoded images in memory (small datasets, many epochs)
    class_aliases: list[str] | None = None  # extra class-name aliases, ALIAS=CLASS (e.g. joyful=happy), beside the
    #   built-in table (angry=anger, happiness=happy, ...); used wherever classes are matched by name
    base_classes: list[str] | None = None  # train on these classes only (base-to-novel); eval then reports base,
    #   novel and their harmonic mean
    shots: int = setting(0, accepts=Range(0, 1_000_000, integer=True))  # few-shot: train on this many images per
    #   class, drawn with run.seed (listed in the run) after data.val_fraction's share is held out; 0: all
    val_fraction: float = setting(0.0, accepts=Range(0, 0.5))  # share of each class's training images held out to
    #   choose the best epoch and the temperature (the test split is then evaluated once); 0: both chosen on the
    #   test split, the paper's protocol


@dataclass
class OptimConfig:
    name: str = setting("adamw", choices=("adamw", "sgd"))  # adamw (stage 1) or sgd (stage 2)
    lr: float = setting(1e-4, accepts=Range(0, 1, lo_open=True))  # peak learning rate (block i of stage 1 gets
    #   lr * layer_decay ** (blocks - i))
    min_lr: float = setting(1e-8, accepts=Range(0, 1))  # end of the cosine decay
    weight_decay: float = setting(5e-4, accepts=UNIT)  # stage 1: only tensors with >= 2 dims
    layer_decay: float = setting(0.65, accepts=Range(0, 1, lo_open=True))  # stage 1 layer-wise decay
    momentum: float = setting(0.9, accepts=Range(0, 1, hi_open=True))  # sgd only
    epochs: int = setting(50, accepts=EPOCHS)  # passes over the training split
    warmup_epochs: float = setting(5, accepts=Range(0, 100_000))  # linear warm-up from 0, per iteration
    batch_size: int = setting(128, accepts=Range(1, 1 << 20, integer=True))  # effective batch per optimiser step,
    #   over all processes and accumulation
    accum_steps: int = setting(1, accepts=Range(1, 1 << 20, integer=True))  # micro-batches per step (batch_size /
    #   (processes * accum_steps) per forward)
    grad_clip: float | None = setting(None, accepts=POSITIVE)  # max gradient norm, None: no clipping


@dataclass
class RunConfig:
    output_dir: str = "runs"  # parent of run directories
    name: str | None = None  # run directory name (default: <dataset>-<stage>-<timestamp>)
    seed: int = setting(1, accepts=SEED)  # each process uses seed + rank
    deterministic: bool = False  # deterministic algorithms, for exact reruns (slower)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    precision: str = setting("auto", choices=PRECISIONS)  # auto (bf16 on GPUs and CPUs with AMX or AVX512-BF16,
    #   else fp32), fp32, bf16, fp16
    eval_every: int = setting(1, accepts=EPOCHS)  # epochs between test-set evaluations
    grad_checkpointing: bool = False  # recompute trainable blocks' activations in backward (less memory)
    compile: bool = False  # torch.compile the transformer blocks (first steps slower while it compiles; on 2 CPU
    #   cores it gained at most 11% after 20 s of compiling, and lost on the tiny models: README, Performance)
    teacher_cache: bool = True  # stage 1, flip-only augmentation: reuse the frozen teacher's embeddings
    threads: int = setting(0, accepts=Range(0, 1024, integer=True))  # CPU threads; 0: chosen from the cores free at
    #   the start, re-checked each epoch
    progress: bool = True  # progress bars (rank 0 only)
    log_to: list[str] = setting(factory=lambda: ["tensorboard"], choices=TRACKERS)  # experiment trackers:
    #   tensorboard, wandb, mlflow (each when installed; a missing one costs a log line)
    final_eval: bool = True  # full evaluation of the best checkpoint at the end (metrics, confusion matrix)
    notice: str | None = None  # said with every use of the trained model (the demo's: drawn faces only)


@dataclass
class Config:
    stage: str = setting("eva", choices=tuple(STAGES))  # eva (stage 1) or cat (stage 2)
    compat: str = setting("none", choices=COMPAT_MODES)  # none (ceprompt's fixes) or authors (the authors' code;
    #   fills every field left null)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    eva: EvaConfig = field(default_factory=EvaConfig)
    cat: CatConfig = field(default_factory=CatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def stage_settings(self) -> Any:
        """The section of the stage being trained (``eva`` or ``cat``: sections are named as their stages)."""
        return getattr(self, self.stage)

    def resolve_compat(self) -> "Config":
        """Fill the fields left null from the compat mode: ceprompt's defaults, or the authors' choices."""
        authors = self.compat == "authors"
        d = self.data
        for name in STAGES:
            getattr(self, name).fill_compat(authors)
        resize, interpolation = AUTHORS_RESIZE.get(d.dataset, ("square", "bicubic")) if authors else \
            ("square", "bicubic")
        d.resize = d.resize or resize
        d.interpolation = d.interpolation or interpolation
        if d.prompt_names is None and authors and d.dataset in AUTHORS_PROMPT_NAMES:
            d.prompt_names = list(AUTHORS_PROMPT_NAMES[d.dataset])
        return self

    def validate(self) -> "Config":
        check_fields(self)
        self.resolve_compat()
        o, d, name = self.optim, self.data, self.run.name
        checks = [
            (STAGES[self.stage].builds_on is not None or not self.backbone.init,
             f"backbone.init={brief(self.backbone.init)} (--init) is the checkpoint a later stage starts from, but "
             f"this config trains stage {STAGES[self.stage].number} (stage: {self.stage}); leave --init out, or "
             "use a stage-2 config"),
            (o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}; expected <= optim.lr ({o.lr})"),
            (o.warmup_epochs <= o.epochs, f"optim.warmup_epochs={o.warmup_epochs}; expected 0..optim.epochs"),
            (len(d.mean) == 3 and len(d.std) == 3, "data.mean and data.std need 3 values each (std > 0)"),
            (all(isinstance(e, str) and e.count("=") == 1 and all(part.strip() for part in e.split("="))
                 for e in d.class_aliases or []),
             f"data.class_aliases={brief(d.class_aliases)}; expected entries ALIAS=CLASS, e.g. joyful=happy"),
            (d.base_classes is None or len(d.base_classes) >= 2,
             f"data.base_classes={brief(d.base_classes)}: a model needs at least two classes to tell apart; name "
             "two or more base classes"),
            (d.prompt_names is None or all(isinstance(n, str) and n.strip() for n in d.prompt_names),
             "data.prompt_names: expected a list of non-empty words"),
            (name is None or (name.strip() and name.isprintable() and "/" not in name and "\\" not in name
                              and name not in (".", "..")),
             f"run.name={brief(name)}: expected a plain folder name (no '/', '..', line breaks or other control "
             "characters); use run.output_dir (--output-dir) for the parent folder"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or the name of a shipped config (``rafdb_stage1`` or ``rafdb_stage1.yaml``)."""
    if "\0" in os.fspath(name):
        raise ConfigError(f"{brief(os.fspath(name))}: a file name cannot hold a NUL character")
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if shipped.is_file() and path.parent == Path("."):
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name}: no such config file (shipped configs: {known})")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then each ``KEY=VALUE`` text override in order (the command line's
    ``--set``), then ``values``: dotted keys to Python values (``{"optim.epochs": 10}``), coerced and checked the
    same way but never parsed from text."""
    cfg = Config()
    if path is not None:
        resolved = resolve_config_path(path)
        merge(cfg, read_yaml(resolved), str(resolved))
    if isinstance(overrides, str):  # one override given as a string, not a list of them
        overrides = [overrides]
    for text in overrides:
        merge(cfg, parse_override(text), f"--set {brief(text)}")
    apply_values(cfg, values or {})
    b = cfg.backbone
    if b.arch and b.path:
        log.warning("backbone.arch=%s: training random weights of that architecture, NOT the CLIP %s; "
                    "backbone.path is recorded as null", b.arch, b.path)
        b.path = None
    return cfg.validate()


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    cfg = Config()
    merge(cfg, data, where)
    return cfg.validate()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
