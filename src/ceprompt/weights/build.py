"""Building CEPrompt models: from a config for training, and from a checkpoint for inference.

A stage-1 checkpoint holds the tuned vision weights and names its backbone; a stage-2 checkpoint
holds the prompt learner and names its stage-1 checkpoint. Loading follows that chain and
refuses any link whose architecture, classes or prompt settings do not match.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from open_clip.model import CLIP

from ..core.config import parse_override
from ..core.errors import CheckpointError, ConfigError
from ..core.io_utils import verified_sha256
from ..core.paths import shown
from ..core.schema import SchemaError, read_json
from ..data.transforms import Preprocess, preprocess_for
from ..experiment.config import BackboneConfig, Config, config_from_dict
from ..model.clip import ClipSpec, build_clip, get_arch, infer_spec
from ..model.stage import BuildOptions, ClassWords, Stage
from ..model.stages import STAGES, ZERO_SHOT, stage_class
from ..model.trainable import load_into, load_trainable
from .checkpoint import check_header_dtypes, kept_copy, non_finite, read_checkpoint, resolve_checkpoint, validate_meta
from .clip_files import load_clip
from .hub import HF_PREFIX, download_model, is_name, resolve_clip

log = logging.getLogger(__name__)
ACTIVATIONS = {"auto": None, "quickgelu": True, "gelu": False}


@dataclass
class Backbone:
    clip: CLIP
    spec: ClipSpec
    record: dict[str, Any]  # how to find these weights again; stored in every checkpoint


def locate_clip(value: str) -> tuple[Path, str | None, bool | None]:
    """(local path, pretrained name or None, QuickGELU hint) for a CLIP file, folder or name."""
    path = Path(value).expanduser()
    if path.exists() or not is_name(value):
        return path, None, None
    resolved = resolve_clip(value)
    log.info("CLIP %s: %s", resolved.name, shown(resolved.path))
    return resolved.path, resolved.name, resolved.quick_gelu


def load_backbone(cfg: BackboneConfig, sha256: str | None = None) -> Backbone:
    """Random weights of ``cfg.arch`` (tests, benchmarks; ``path`` is then ignored), else the user's CLIP
    from ``cfg.path``: a file, a folder or a pretrained name (``ViT-B-16``, ``hf-hub:ORG/NAME``).

    ``sha256``: the file's hash when the caller has just verified it (not computed again).
    """
    if cfg.arch:
        clip = build_clip(cfg.arch, seed=cfg.seed)
        return Backbone(clip, get_arch(cfg.arch), {"path": None, "arch": cfg.arch, "seed": cfg.seed})
    if not cfg.path:
        raise ConfigError("no CLIP weights given: set backbone.path (or pass --clip) to your CLIP file, folder or a "
                          "pretrained name such as ViT-B-16")
    path, name, quick_gelu = locate_clip(cfg.path)
    activation = ACTIVATIONS[cfg.activation]
    loaded = load_clip(path, quick_gelu=quick_gelu if activation is None else activation)
    # a name's file keeps its snapshot path in the Hugging Face cache (resolving it would give a blob)
    where = os.path.abspath(path) if name else str(path.resolve())
    record = {"path": where, "format": loaded.format, "activation": cfg.activation,
              "sha256": sha256 or verified_sha256(path)}
    if name:
        record["name"] = name
    return Backbone(loaded.model, loaded.spec, record)


def resolve_recorded(record: dict[str, Any], checkpoint: Path, what: str) -> tuple[Path, str | None]:
    """A file a checkpoint refers to, found and verified before it is opened.

    A relative path is taken relative to the checkpoint's folder, never the working directory; the
    ``relpath`` written beside an absolute one lets a folder of runs move as a whole. The recorded
    SHA-256 must match (hashes are cached by size and modification time).
    """
    raw = record.get("path")
    if not isinstance(raw, str) or not raw:
        raise CheckpointError(f"{checkpoint}: no path recorded for its {what}")
    base = checkpoint.parent
    candidates = [base / record["relpath"]] if isinstance(record.get("relpath"), str) else []
    candidates.append(Path(raw) if Path(raw).is_absolute() else base / raw)
    candidates = list(dict.fromkeys(Path(os.path.abspath(c)) for c in candidates))
    existing = [c for c in candidates if c.exists()]
    if not existing:
        raise CheckpointError(f"{checkpoint}: its {what} {candidates[-1]} is missing; restore it there")
    want = record.get("sha256")
    if not want:
        log.warning("%s: no SHA-256 recorded for its %s %s; it is used unverified", checkpoint, what, existing[0])
        return existing[0], None
    for found in existing:  # a run moved beside another may find a different file first: try each in order
        if verified_sha256(found) == want:
            return found, want
        kept = kept_copy(found, str(want))
        if kept.is_file() and verified_sha256(kept) == want:
            log.info("%s: its %s %s has changed since (a resumed run); using the copy kept as %s", checkpoint, what,
                     found, kept.name)
            return kept, want
    got = verified_sha256(existing[0])
    tried = " nor ".join(str(c) for c in existing)
    raise CheckpointError(f"{checkpoint}: its {what} {tried} is not the file it was made with (SHA-256 "
                          f"{got[:16]}... now, {str(want)[:16]}... recorded); restore that file or retrain")


def backbone_from_record(record: dict[str, Any], checkpoint: Path) -> Backbone:
    if record.get("path") and record.get("name") and not Path(record["path"]).exists():
        # a pretrained name (ViT-B-16, hf-hub:...): this machine's Hugging Face cache, not the recorded path
        record = {**record, "path": str(locate_clip(record["name"])[0]), "relpath": None}
    if record.get("path"):
        path, sha = resolve_recorded(record, checkpoint, "CLIP backbone")
        activation = record.get("activation", "auto")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"{checkpoint}: backbone activation {activation!r}; expected one of {list(ACTIVATIONS)}")
        return load_backbone(BackboneConfig(path=str(path), activation=activation), sha256=sha)
    if not isinstance(record.get("arch"), str):
        raise CheckpointError(f"{checkpoint}: its backbone record names neither a file nor an architecture")
    return load_backbone(BackboneConfig(path=None, arch=record["arch"], seed=int(record.get("seed", 0))))


def check_spec(spec: ClipSpec, recorded: dict[str, Any], where: str) -> None:
    want = ClipSpec.from_dict(recorded, where=where)
    if spec != want:
        diffs = [f"{k}: {getattr(want, k)} vs {getattr(spec, k)}" for k in spec.to_dict()
                 if getattr(want, k) != getattr(spec, k)]
        raise CheckpointError(f"{where} was trained on another backbone ({'; '.join(diffs)})")


def build_stage(cfg: Config, clip: CLIP, class_names: Sequence[str], training: bool = False) -> Stage:
    """The config's stage on ``clip``, scoring ``class_names`` (the run's prompt words where the config names them)."""
    options = BuildOptions(training=training, grad_checkpointing=cfg.run.grad_checkpointing,
                           teacher_cache=cfg.run.teacher_cache)
    return stage_class(cfg.stage).build(clip, cfg.stage_settings, cfg.head,
                                        ClassWords.of(class_names, cfg.data.prompt_names), options)


Checkpoint = tuple[dict[str, torch.Tensor], dict[str, Any], Path]  # what read_checkpoint returns


def _load_base_into(backbone: Backbone, base: Checkpoint, stage: str, sha256: str | None = None) -> dict[str, Any]:
    """Overlay the checkpoint a stage builds on (already read; it must be of ``stage``) on ``backbone``; returns
    the record the new checkpoint keeps of it."""
    tensors, meta, path = base
    if meta.get("stage") != stage:
        number = STAGES[stage].number
        raise CheckpointError(f"{path}: backbone.init must be a stage-{number} ({stage}) checkpoint, this is "
                              f"{meta.get('stage')!r}")
    check_spec(backbone.spec, meta["clip_spec"], str(path))
    # an inference-mode model of that stage names exactly the weights the checkpoint must hold
    cfg = config_from_dict(meta["config"], where=f"{path} (recorded config)")
    load_trainable(build_stage(cfg, backbone.clip, meta["class_names"]), tensors, str(path))
    return {"path": str(path.resolve()), "sha256": sha256 or verified_sha256(path), "class_names": meta["class_names"],
            "backbone": meta["backbone"]}


@dataclass
class BuiltModel:
    model: Stage
    spec: ClipSpec
    backbone: dict[str, Any]
    init: dict[str, Any] | None  # stage 2: the stage-1 checkpoint it builds on


def check_init(cfg: Config) -> Path | None:
    """The checkpoint a later stage starts from (``backbone.init``, ``--init``), found before anything loads;
    None for a stage that starts from CLIP."""
    base_stage = STAGES[cfg.stage].builds_on
    if base_stage is None:
        return None
    number = STAGES[base_stage].number
    if not cfg.backbone.init:
        raise CheckpointError(f"stage {STAGES[cfg.stage].number} ({cfg.stage}) needs the stage-{number} checkpoint "
                              f"it starts from: pass --init (a stage-{number} run directory or checkpoint) or set "
                              "backbone.init")
    try:
        return resolve_checkpoint(cfg.backbone.init)
    except CheckpointError as exc:
        raise CheckpointError(f"backbone.init (--init): {exc}; pass --init with your stage-{number} run directory "
                              "or its checkpoint") from None


def build_for_training(cfg: Config, class_names: Sequence[str]) -> BuiltModel:
    base_stage = stage_class(cfg.stage).builds_on
    if base_stage is None:
        backbone = load_backbone(cfg.backbone)
        return BuiltModel(build_stage(cfg, backbone.clip, class_names, training=True), backbone.spec,
                          backbone.record, None)
    base = read_checkpoint(check_init(cfg))
    _, base_meta, base_path = base
    if cfg.backbone.path or cfg.backbone.arch:
        backbone = load_backbone(cfg.backbone)
        recorded = base_meta["backbone"].get("sha256")
        if recorded and recorded != backbone.record.get("sha256"):
            raise CheckpointError(f"{base_path} was trained on another CLIP file ({base_meta['backbone'].get('path')}) "
                                  f"than backbone.path {cfg.backbone.path} (their SHA-256 differ); a later stage must "
                                  "use the backbone of the checkpoint it starts from: leave backbone.path unset")
    else:
        backbone = backbone_from_record(base_meta["backbone"], base_path)
    init = _load_base_into(backbone, base, base_stage)
    if list(init["class_names"]) != list(class_names):
        log.warning("the stage-%d checkpoint was trained for classes %s; this stage uses %s",
                    STAGES[base_stage].number, init["class_names"], class_names)
    return BuiltModel(build_stage(cfg, backbone.clip, class_names, training=True), backbone.spec, backbone.record,
                      init)


def build_zero_shot(cfg: Config, class_names: Sequence[str]) -> BuiltModel:
    """Plain CLIP scored with the stage-1 prompts and the same head: the baseline."""
    backbone = load_backbone(cfg.backbone)
    model = ZERO_SHOT.zero_shot(backbone.clip, getattr(cfg, ZERO_SHOT.name), cfg.head,
                                ClassWords.of(class_names, cfg.data.prompt_names))
    return BuiltModel(model, backbone.spec, backbone.record, None)


def with_relpath(record: dict[str, Any] | None, folder: Path) -> dict[str, Any] | None:
    """``record`` plus the path of its file relative to ``folder`` (where the checkpoint will be)."""
    if not record or not record.get("path"):
        return record
    try:
        rel = os.path.relpath(record["path"], folder.resolve())
    except ValueError:  # another drive (Windows)
        return record
    return {**record, "relpath": rel}


def checkpoint_meta(cfg: Config, built: BuiltModel, class_names: Sequence[str], preprocess: Preprocess,
                    folder: Path | None = None, **extra: Any) -> dict[str, Any]:
    """The description saved in a checkpoint; ``folder``: where it is saved (for relative paths)."""
    prompts = built.model.prompts()
    backbone, init = built.backbone, built.init
    if folder is not None:
        backbone, init = with_relpath(backbone, folder), with_relpath(init, folder)
    return {
        "stage": cfg.stage,
        "class_names": list(class_names),
        "dataset": cfg.data.dataset,
        "clip_spec": built.spec.to_dict(),
        "backbone": backbone,
        "init": init,
        "prompts": prompts,
        "preprocess": preprocess.to_dict(),
        "config": cfg.to_dict(),
        "notice": cfg.run.notice,
        **extra,
    }


@dataclass
class LoadedModel:
    model: Stage
    meta: dict[str, Any]
    path: Path
    preprocess: Preprocess
    class_names: list[str]


HUB_FORMAT = "ceprompt-hub"  # config.json "format" of a folder written by `ceprompt export hub`


def is_hub_folder(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        config = read_json((path / "config.json").read_bytes(), str(path / "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == HUB_FORMAT


def load_hub_folder(folder: Path, overrides: Sequence[str] = ()) -> LoadedModel:
    """A model from ``ceprompt export hub``: the whole CLIP and the prompt learner in one safetensors file."""
    from safetensors import safe_open

    where = folder / "config.json"
    try:
        meta = read_json(where.read_bytes(), str(where))
    except OSError as exc:
        raise CheckpointError(f"{where}: unreadable ({exc.strerror or exc})") from None
    except SchemaError as exc:
        raise CheckpointError(str(exc)) from None
    validate_meta(meta, str(where))
    meta = _with_eval_overrides(meta, overrides, str(where))
    spec = ClipSpec.from_dict(meta["clip_spec"], where=str(where)).validate(str(where))
    weights = folder / "model.safetensors"
    recorded = meta.get("weights_sha256")
    if recorded is not None and verified_sha256(weights) != recorded:
        raise CheckpointError(f"{weights} is not the file {where} describes (SHA-256 differs): an export that was "
                              "interrupted or altered; export it again")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            check_header_dtypes(fh, str(weights))
            # the declared shape must be the one of the weights, before a model of that shape is built
            shapes = {k[len("clip."):]: torch.empty(fh.get_slice(k).get_shape(), device="meta")
                      for k in fh.keys() if k.startswith("clip.")}
            held = infer_spec(shapes, {"vision_heads": spec.vision_heads, "text_heads": spec.text_heads,
                                       "quick_gelu": spec.quick_gelu})
            if held != spec:
                raise CheckpointError(f"{where} declares a CLIP of {spec.describe()}, but {weights.name} holds "
                                      f"{held.describe()}")
            tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{weights}: holds non-finite weights ({', '.join(bad[:3])})")
    clip = build_clip(spec)
    clip_weights = {k[len("clip."):]: v for k, v in tensors.items() if k.startswith("clip.")}
    result = clip.load_state_dict(clip_weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{weights}: CLIP weights do not fit {spec.describe()} (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    cfg = config_from_dict(meta["config"], where=f"{where} (config)")
    class_names = list(meta["class_names"])
    model = build_stage(cfg, clip, class_names)
    load_into(model.own_state_dict(), {k: v for k, v in tensors.items() if not k.startswith("clip.")}, str(weights))
    return LoadedModel(model.eval(), meta, folder, Preprocess.from_dict(meta["preprocess"]), class_names)


# Settings that change how a trained model scores, not what it learned: `eval --set` may override them.
EVAL_OVERRIDES = tuple(f"{name}.{key}" for name, stage in STAGES.items()
                       for key in getattr(stage.settings_type, "EVAL_TIME", ()))


def _with_eval_overrides(meta: dict[str, Any], overrides: Sequence[str], where: str) -> dict[str, Any]:
    if not overrides:
        return meta
    config = copy.deepcopy(meta["config"])
    for text in overrides:
        nested = parse_override(text)
        key = text.split("=", 1)[0].strip()
        if key not in EVAL_OVERRIDES:
            raise ConfigError(f"--set {text}: a trained model's {key} cannot change at evaluation; only "
                              f"{', '.join(EVAL_OVERRIDES)} can")
        section, name = key.split(".")
        config[section][name] = nested[section][name]
    return {**meta, "config": config}


def load_trained(checkpoint: str | Path, overrides: Sequence[str] = ()) -> LoadedModel:
    """A trained CEPrompt model (either stage) ready for inference, on the CPU, in eval mode: a checkpoint,
    a run directory, an imported or exported folder, or ``hf-hub:ORG/NAME[@REV]``. ``overrides``:
    ``KEY=VALUE`` for the evaluation-time settings in :data:`EVAL_OVERRIDES`."""
    if isinstance(checkpoint, str) and checkpoint.startswith(HF_PREFIX):
        return load_hub_folder(download_model(checkpoint), overrides)
    if is_hub_folder(Path(checkpoint).expanduser()):
        return load_hub_folder(Path(checkpoint).expanduser(), overrides)
    tensors, meta, path = read_checkpoint(checkpoint)
    meta = _with_eval_overrides(meta, overrides, str(path))
    cfg = config_from_dict(meta["config"], where=f"{path} (recorded config)")
    backbone = _backbone_for(meta, path)
    model = build_stage(cfg, backbone.clip, list(meta["class_names"]))
    load_trainable(model, tensors, str(path))
    pre = Preprocess.from_dict(meta["preprocess"])
    return LoadedModel(model.eval(), meta, path, pre, list(meta["class_names"]))


def _backbone_for(meta: dict[str, Any], path: Path) -> Backbone:
    """The CLIP a checkpoint's stage runs on: its recorded backbone, with the checkpoint it builds on (if any)
    found, verified and loaded in."""
    base_stage = stage_class(meta["stage"]).builds_on
    if base_stage is None:
        backbone = backbone_from_record(meta["backbone"], path)
        check_spec(backbone.spec, meta["clip_spec"], str(path))
        return backbone
    init = meta.get("init")
    what = f"stage-{STAGES[base_stage].number} checkpoint"
    if not isinstance(init, dict):
        raise CheckpointError(f"{path}: a stage-{STAGES[meta['stage']].number} checkpoint without its {what} "
                              "record (description field init)")
    init_path, init_sha = resolve_recorded(init, path, what)
    base = read_checkpoint(init_path)
    backbone = backbone_from_record(base[1]["backbone"], base[2])
    check_spec(backbone.spec, meta["clip_spec"], str(path))
    _load_base_into(backbone, base, base_stage, init_sha)
    return backbone


def preprocess_from_config(cfg: Config, spec: ClipSpec) -> Preprocess:
    return preprocess_for(spec.image_size, cfg.data.mean, cfg.data.std, cfg.data.interpolation, cfg.data.resize)
