"""One config object for a run: dataclasses built from a YAML file plus dotted ``--set`` overrides.

Defaults are the paper's stage-1 RAF-DB settings (docs/method.md sections 2-4); the shipped YAML files
in ``configs/`` state every value that differs per dataset and stage. The resolved config is
written into each run directory and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..model.prompts import DEFAULT_TEMPLATE
from .errors import ConfigError, brief
from .ranges import COUNT, POSITIVE, POSITIVE_INT, UNIT, Range, check

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGES = ("eva", "cat")
COMPAT_MODES = ("none", "authors")
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
log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    path: str | None = None  # the user's CLIP weights (any format ceprompt reads)
    arch: str | None = None  # without `path`: random weights of this named architecture (tests, benchmarks)
    seed: int = 0  # seed of the random weights when `path` is None
    activation: str = "auto"  # auto (from the file; QuickGELU for plain state dicts), quickgelu or gelu
    init: str | None = None  # stage 2: the stage-1 checkpoint (.safetensors file or run directory)


@dataclass
class DataConfig:
    dataset: str = "rafdb"  # rafdb, affectnet7, affectnet8, ferplus or folder
    root: str | None = None  # dataset root folder, laid out as docs/method.md section 4 / README describe
    image_dir: str | None = None  # rafdb: image folder under root (default Image/aligned_224, else Image/aligned)
    classes: list[str] | None = None  # folder datasets: class order (default: sorted folder names)
    prompt_names: list[str] | None = None  # words for the classes in prompts (None: the class names; compat
    #   authors: the authors' words, e.g. "disgusted"); labels shown to users stay the class names
    resize: str | None = None  # square (resize to size x size) or shorter (shorter side, centre crop); None: auto
    interpolation: str | None = None  # bicubic or bilinear; None: bicubic (compat authors: theirs per dataset)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # normalisation, stored with checkpoints
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per channel, as mean
    augment: str | None = None  # rafdb (resize + flip), affectnet (+ affine, erasing) or none; None: dataset's own
    balanced_sampler: bool | None = None  # draw classes equally (1/count weights); None: dataset's own (AffectNet)
    workers: int = 4  # data loading processes per GPU/process
    verify_images: bool = True  # open every image header before training; unreadable files are errors
    skip_bad_images: bool = False  # decode every image first; leave unreadable ones out (listed in the run)
    allow_outside_root: bool = False  # accept index paths that are absolute or leave the root through ../
    cache_images: bool = False  # keep decoded images in memory (small datasets, many epochs)
    class_aliases: list[str] | None = None  # extra class-name aliases, ALIAS=CLASS (e.g. joyful=happy), beside the
    #   built-in table (angry=anger, happiness=happy, ...); used wherever classes are matched by name
    base_classes: list[str] | None = None  # train on these classes only (base-to-novel); eval then reports base,
    #   novel and their harmonic mean
    shots: int = 0  # few-shot: train on this many images per class, drawn with run.seed (listed in the run); 0: all
    val_fraction: float = 0.0  # share of each class's training images held out to choose the best epoch and the
    #   temperature (the test split is then evaluated once); 0: both chosen on the test split, the paper's protocol


@dataclass
class HeadSection:
    top_k: int = 16  # local score: mean of the k best patch similarities
    alpha: float = 0.5  # weight of the local score
    mode: str = "both"  # both, global or local
    logit_scale: float = 1.0  # scores x this = cross-entropy logits


@dataclass
class EvaConfig:
    fix_layer: int = 2  # vision blocks below this index stay frozen
    template: str = DEFAULT_TEMPLATE  # fixed class prompt, {} is the class name
    kd_weight: float = 1.0  # lambda of the L1 distillation term
    kd_target: str | None = None  # normalized, or raw (the authors' unnormalised teacher); None: by compat
    raw_text_at_eval: bool = False  # the authors' stage-1 test(): unnormalised class text embeddings (a defect)


@dataclass
class CatConfig:
    n_ctx: int = 2  # learnable context vectors
    ctx_init: str = "a photo of"  # phrase whose first n_ctx tokens initialise them ('' = random)
    prompt_depth: int = 9  # J: deep prompts before blocks 1..J-1 of both towers
    invariant_token: bool = False  # an extra learnable class-invariant token before the context
    vision_prompts: str | None = None  # append (own slots, MaPLe) or overwrite (the authors'); None: by compat
    prompt_layout: str | None = None  # with the invariant token: ceprompt ([SOS] inv ctx <init rest> name .) or
    #   authors ([SOS] X X X name ., deep prompts in slots 1..n_ctx); None: by compat


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (stage 1) or sgd (stage 2)
    lr: float = 1e-4  # peak learning rate (block i of stage 1 gets lr * layer_decay ** (blocks - i))
    min_lr: float = 1e-8  # end of the cosine decay
    weight_decay: float = 5e-4  # stage 1: only tensors with >= 2 dims
    layer_decay: float = 0.65  # stage 1 layer-wise decay
    momentum: float = 0.9  # sgd only
    epochs: int = 50  # passes over the training split
    warmup_epochs: float = 5  # linear warm-up from 0, per iteration
    batch_size: int = 128  # effective batch per optimiser step, over all processes and accumulation
    accum_steps: int = 1  # micro-batches per step (batch_size / (processes * accum_steps) per forward)
    grad_clip: float | None = None  # max gradient norm, None: no clipping


@dataclass
class RunConfig:
    output_dir: str = "runs"  # parent of run directories
    name: str | None = None  # run directory name (default: <dataset>-<stage>-<timestamp>)
    seed: int = 1  # each process uses seed + rank
    deterministic: bool = False  # deterministic algorithms, for exact reruns (slower)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs and CPUs with AMX or AVX512-BF16, else fp32), fp32, bf16, fp16
    eval_every: int = 1  # epochs between test-set evaluations
    grad_checkpointing: bool = False  # recompute trainable blocks' activations in backward (less memory)
    compile: bool = False  # torch.compile the transformer blocks (first steps slower while it compiles; on 2 CPU
    #   cores it gained at most 11% after 20 s of compiling, and lost on the tiny models: README, Performance)
    teacher_cache: bool = True  # stage 1, flip-only augmentation: reuse the frozen teacher's embeddings
    threads: int = 0  # CPU threads; 0: chosen from the cores free at the start, re-checked each epoch
    progress: bool = True  # progress bars (rank 0 only)
    log_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # experiment trackers: tensorboard, wandb,
    #   mlflow (each when installed; a missing one costs a log line)
    final_eval: bool = True  # full evaluation of the best checkpoint at the end (metrics, confusion matrix)
    notice: str | None = None  # said with every use of the trained model (the demo's: drawn faces only)


@dataclass
class Config:
    stage: str = "eva"  # eva (stage 1) or cat (stage 2)
    compat: str = "none"  # none (ceprompt's fixes) or authors (the authors' code; fills every field left null)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadSection = field(default_factory=HeadSection)
    eva: EvaConfig = field(default_factory=EvaConfig)
    cat: CatConfig = field(default_factory=CatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve_compat(self) -> "Config":
        """Fill the fields left null from the compat mode: ceprompt's defaults, or the authors' choices."""
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"compat={brief(self.compat)}; expected one of {COMPAT_MODES}")
        authors = self.compat == "authors"
        d = self.data
        if self.eva.kd_target is None:
            self.eva.kd_target = "raw" if authors else "normalized"
        if self.cat.vision_prompts is None:
            self.cat.vision_prompts = "overwrite" if authors else "append"
        if self.cat.prompt_layout is None:
            self.cat.prompt_layout = "authors" if authors else "ceprompt"
        resize, interpolation = AUTHORS_RESIZE.get(d.dataset, ("square", "bicubic")) if authors else \
            ("square", "bicubic")
        d.resize = d.resize or resize
        d.interpolation = d.interpolation or interpolation
        if d.prompt_names is None and authors and d.dataset in AUTHORS_PROMPT_NAMES:
            d.prompt_names = list(AUTHORS_PROMPT_NAMES[d.dataset])
        return self

    def validate(self) -> "Config":
        self.resolve_compat()
        for name, value in _numeric_fields(self):
            if value is not None or name not in NULLABLE:
                check(name, value, RANGES[name])
        o = self.optim
        checks = [
            (self.stage in STAGES, f"stage={brief(self.stage)}; expected one of {STAGES}"),
            (o.name in ("adamw", "sgd"), f"optim.name={brief(o.name)}; expected adamw or sgd"),
            (self.stage == "cat" or not self.backbone.init,
             f"backbone.init={brief(self.backbone.init)} (--init) is the stage-1 checkpoint stage 2 starts from, but this "
             "config trains stage 1 (stage: eva); leave --init out, or use a stage-2 config"),
            (o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}; expected <= optim.lr ({o.lr})"),
            (o.warmup_epochs <= o.epochs, f"optim.warmup_epochs={o.warmup_epochs}; expected 0..optim.epochs"),
            (self.run.precision in ("auto", "fp32", "bf16", "fp16"),
             f"run.precision={brief(self.run.precision)}; expected auto, fp32, bf16 or fp16"),
            (self.backbone.activation in ("auto", "quickgelu", "gelu"),
             f"backbone.activation={brief(self.backbone.activation)}; expected auto, quickgelu or gelu"),
            (len(self.data.mean) == 3 and len(self.data.std) == 3,
             "data.mean and data.std need 3 values each (std > 0)"),
            (self.data.resize in ("square", "shorter"), f"data.resize={brief(self.data.resize)}; expected square or shorter"),
            (self.data.interpolation in ("bicubic", "bilinear"),
             f"data.interpolation={brief(self.data.interpolation)}; expected bicubic or bilinear"),
            (all(isinstance(e, str) and e.count("=") == 1 and all(part.strip() for part in e.split("="))
                 for e in self.data.class_aliases or []),
             f"data.class_aliases={brief(self.data.class_aliases)}; expected entries ALIAS=CLASS, e.g. joyful=happy"),
            (all(name in ("tensorboard", "wandb", "mlflow") for name in self.run.log_to),
             f"run.log_to={brief(self.run.log_to)}; expected a list of tensorboard, wandb and mlflow"),
            (self.cat.prompt_layout in ("ceprompt", "authors"),
             f"cat.prompt_layout={brief(self.cat.prompt_layout)}; expected ceprompt or authors"),
            (self.data.prompt_names is None or all(isinstance(n, str) and n.strip() for n in self.data.prompt_names),
             "data.prompt_names: expected a list of non-empty words"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


# Allowed values of every numeric field (tests check that none is missing). Upper bounds are far
# beyond any sensible setting; they exist to refuse typos such as optim.lr=1e30 before a run starts.
RANGES: dict[str, Range] = {
    "backbone.seed": Range(0, 2**32 - 1, integer=True),
    "data.mean": Range(-10, 10),
    "data.std": Range(0, 10, lo_open=True),
    "data.workers": Range(0, 256, integer=True),
    "data.val_fraction": Range(0, 0.5),
    "data.shots": Range(0, 1_000_000, integer=True),
    "head.top_k": POSITIVE_INT,
    "head.alpha": UNIT,
    "head.logit_scale": Range(0, 1000, lo_open=True),
    "eva.fix_layer": COUNT,
    "eva.kd_weight": Range(0, 1000),
    "cat.n_ctx": Range(0, 64, integer=True),
    "cat.prompt_depth": COUNT,
    "optim.lr": Range(0, 1, lo_open=True),
    "optim.min_lr": Range(0, 1),
    "optim.weight_decay": UNIT,
    "optim.layer_decay": Range(0, 1, lo_open=True),
    "optim.momentum": Range(0, 1, hi_open=True),
    "optim.epochs": Range(1, 100_000, integer=True),
    "optim.warmup_epochs": Range(0, 100_000),
    "optim.batch_size": Range(1, 1 << 20, integer=True),
    "optim.accum_steps": Range(1, 1 << 20, integer=True),
    "optim.grad_clip": POSITIVE,
    "run.seed": Range(0, 2**32 - 1, integer=True),
    "run.eval_every": Range(1, 100_000, integer=True),
    "run.threads": Range(0, 1024, integer=True),
}
NULLABLE = {"optim.grad_clip"}  # None means "off"


def _numeric_fields(cfg: "Config") -> list[tuple[str, Any]]:
    """(dotted name, value) of every int/float field and every element of a list-of-numbers field."""
    out: list[tuple[str, Any]] = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            name, value = f"{section.name}.{f.name}", getattr(obj, f.name)
            if not _is_numeric(hints[f.name]):
                continue
            if isinstance(value, list):
                out.extend((name, v) for v in value)
            else:
                out.append((name, value))
    return out


def _is_numeric(annotation: Any) -> bool:
    options = typing.get_args(annotation) or (annotation,)
    if typing.get_origin(annotation) is list:
        options = typing.get_args(annotation)
    return any(o in (int, float) for o in options) and not any(o in (str, bool) for o in options)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {brief(value)}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {brief(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {brief(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {brief(value)}")
    return value


def _merge(obj: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    fields = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {brief(dotted)}; expected one of {sorted(prefix + k for k in fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {brief(dotted)} must be a mapping of its fields, got {brief(value)}")
            _merge(current, value, where, dotted + ".")
        else:
            try:
                setattr(obj, key, _coerce(value, fields[key], dotted))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or the name of a shipped config (``rafdb_stage1`` or ``rafdb_stage1.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if shipped.is_file() and path.parent == Path("."):
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name}: no such config file (shipped configs: {known})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except ValueError as exc:  # an integer of thousands of digits, say
        raise ConfigError(f"{path}: unreadable value ({brief(str(exc))})") from None
    check_size(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


MAX_VALUES = 10_000  # a config holds about a hundred values


def check_size(data: Any, where: str) -> None:
    """Refuse YAML whose aliases expand it beyond any config's size ("billion laughs": a few hundred bytes that
    stand for gigabytes once walked), counting without expanding."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: holds more than {MAX_VALUES:,} values once its YAML aliases are expanded; "
                              "a config needs no aliases")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``, the value read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {brief(text)}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {brief(text)}: malformed key {brief(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: an integer of thousands of digits
        value = raw
    check_size(value, f"--set {brief(text)}")
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as written (nested mappings) as ``section.key`` -> value, the names ``--set`` takes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each ``KEY=VALUE`` override in order."""
    cfg = Config()
    if path is not None:
        resolved = resolve_config_path(path)
        _merge(cfg, read_yaml(resolved), str(resolved))
    for text in overrides:
        _merge(cfg, parse_override(text), f"--set {text}")
    b = cfg.backbone
    if b.arch and b.path:
        log.warning("backbone.arch=%s: training random weights of that architecture, NOT the CLIP %s; "
                    "backbone.path is recorded as null", b.arch, b.path)
        b.path = None
    return cfg.validate()


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    cfg = Config()
    _merge(cfg, data, where)
    return cfg.validate()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
