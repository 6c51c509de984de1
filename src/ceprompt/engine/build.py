"""Building CEPrompt models: from a config for training, and from a checkpoint for inference.

A stage-1 checkpoint holds the tuned vision weights and names its backbone; a stage-2 checkpoint
holds the prompt learner and names its stage-1 checkpoint. Loading follows that chain and
refuses any link whose architecture, classes or prompt settings do not match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from open_clip.model import CLIP
from torch import nn

from ..cat import CATModel
from ..clip_backbone import ClipSpec, build_clip, get_arch
from ..clip_files import load_clip
from ..config import BackboneConfig, Config, config_from_dict
from ..data.transforms import Preprocess, preprocess_for
from ..errors import CheckpointError, ConfigError
from ..eva import EVAModel
from ..head import HeadConfig
from ..io_utils import sha256_file
from ..trainable import load_trainable
from .checkpoint import read_checkpoint

log = logging.getLogger(__name__)
ACTIVATIONS = {"auto": None, "quickgelu": True, "gelu": False}


@dataclass
class Backbone:
    clip: CLIP
    spec: ClipSpec
    record: dict[str, Any]  # how to find these weights again; stored in every checkpoint


def load_backbone(cfg: BackboneConfig, hash_file: bool = True) -> Backbone:
    """The user's CLIP from ``cfg.path``, or random weights of ``cfg.arch`` (tests, demo)."""
    if cfg.path:
        loaded = load_clip(cfg.path, quick_gelu=ACTIVATIONS[cfg.activation])
        path = Path(cfg.path).expanduser().resolve()
        record = {"path": str(path), "format": loaded.format, "activation": cfg.activation}
        if hash_file and path.is_file():
            record["sha256"] = sha256_file(path)
        return Backbone(loaded.model, loaded.spec, record)
    if not cfg.arch:
        raise ConfigError("no CLIP weights given: set backbone.path (or pass --clip) to your CLIP file or folder")
    clip = build_clip(cfg.arch, seed=cfg.seed)
    return Backbone(clip, get_arch(cfg.arch), {"path": None, "arch": cfg.arch, "seed": cfg.seed})


def backbone_from_record(record: dict[str, Any], where: str) -> Backbone:
    if record.get("path"):
        path = Path(record["path"])
        if not path.exists():
            raise CheckpointError(f"{where}: its CLIP backbone {path} is missing; restore it there "
                                  "or retrain against the new location")
        return load_backbone(BackboneConfig(path=str(path), activation=record.get("activation", "auto")),
                             hash_file=False)
    return load_backbone(BackboneConfig(path=None, arch=record["arch"], seed=int(record.get("seed", 0))))


def check_spec(spec: ClipSpec, recorded: dict[str, Any], where: str) -> None:
    want = ClipSpec.from_dict(recorded, where=where)
    if spec != want:
        diffs = [f"{k}: {getattr(want, k)} vs {getattr(spec, k)}" for k in spec.to_dict()
                 if getattr(want, k) != getattr(spec, k)]
        raise CheckpointError(f"{where} was trained on another backbone ({'; '.join(diffs)})")


def head_config(cfg: Config) -> HeadConfig:
    h = cfg.head
    return HeadConfig(top_k=h.top_k, alpha=h.alpha, mode=h.mode, logit_scale=h.logit_scale)


def _stage1_model(cfg: Config, clip: CLIP, class_names: Sequence[str], training: bool, zero_shot: bool = False
                  ) -> EVAModel:
    fix_layer = len(clip.visual.transformer.resblocks) if zero_shot else cfg.eva.fix_layer
    return EVAModel(
        clip, class_names, head=head_config(cfg), fix_layer=fix_layer, template=cfg.eva.template,
        kd_weight=cfg.eva.kd_weight if training else 0.0, kd_target=cfg.eva.kd_target,
        grad_checkpointing=cfg.run.grad_checkpointing,
    )


def _stage2_model(cfg: Config, clip: CLIP, class_names: Sequence[str]) -> CATModel:
    c = cfg.cat
    return CATModel(
        clip, class_names, head=head_config(cfg), n_ctx=c.n_ctx, ctx_init=c.ctx_init, prompt_depth=c.prompt_depth,
        invariant_token=c.invariant_token, vision_prompts=c.vision_prompts,
        grad_checkpointing=cfg.run.grad_checkpointing,
    )


def _load_stage1_into(backbone: Backbone, init: str | Path) -> dict[str, Any]:
    tensors, meta, path = read_checkpoint(init)
    if meta.get("stage") != "eva":
        raise CheckpointError(f"{path}: backbone.init must be a stage-1 (eva) checkpoint, this is {meta.get('stage')!r}")
    check_spec(backbone.spec, meta["clip_spec"], str(path))
    # an inference-mode stage-1 model names exactly the weights the checkpoint must hold
    cfg1 = config_from_dict(meta["config"], where=f"{path} (recorded config)")
    load_trainable(_stage1_model(cfg1, backbone.clip, meta["class_names"], training=False), tensors, str(path))
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "class_names": meta["class_names"],
            "backbone": meta["backbone"]}


@dataclass
class BuiltModel:
    model: nn.Module
    spec: ClipSpec
    backbone: dict[str, Any]
    init: dict[str, Any] | None  # stage 2: the stage-1 checkpoint it builds on


def build_for_training(cfg: Config, class_names: Sequence[str]) -> BuiltModel:
    if cfg.stage == "eva":
        backbone = load_backbone(cfg.backbone)
        return BuiltModel(_stage1_model(cfg, backbone.clip, class_names, training=True), backbone.spec,
                          backbone.record, None)
    if not cfg.backbone.init:
        raise CheckpointError("stage 2 (cat) needs the stage-1 checkpoint: pass --init or set backbone.init")
    _, init_meta, init_path = read_checkpoint(cfg.backbone.init)
    if cfg.backbone.path:
        backbone = load_backbone(cfg.backbone)
    else:
        backbone = backbone_from_record(init_meta["backbone"], str(init_path))
    init = _load_stage1_into(backbone, init_path)
    if list(init["class_names"]) != list(class_names):
        log.warning("stage-1 checkpoint was trained for classes %s; stage 2 uses %s", init["class_names"], class_names)
    return BuiltModel(_stage2_model(cfg, backbone.clip, class_names), backbone.spec, backbone.record, init)


def build_zero_shot(cfg: Config, class_names: Sequence[str]) -> BuiltModel:
    """Plain CLIP scored with the stage-1 prompts and the same head: the baseline."""
    backbone = load_backbone(cfg.backbone)
    model = _stage1_model(cfg, backbone.clip, class_names, training=False, zero_shot=True)
    return BuiltModel(model, backbone.spec, backbone.record, None)


def checkpoint_meta(cfg: Config, built: BuiltModel, class_names: Sequence[str], preprocess: Preprocess,
                    **extra: Any) -> dict[str, Any]:
    model = built.model
    prompts = model.prompts if isinstance(model, EVAModel) else None
    return {
        "stage": cfg.stage,
        "class_names": list(class_names),
        "dataset": cfg.data.dataset,
        "clip_spec": built.spec.to_dict(),
        "backbone": built.backbone,
        "init": built.init,
        "prompts": prompts,
        "preprocess": preprocess.to_dict(),
        "config": cfg.to_dict(),
        **extra,
    }


@dataclass
class LoadedModel:
    model: nn.Module
    meta: dict[str, Any]
    path: Path
    preprocess: Preprocess
    class_names: list[str]


def load_trained(checkpoint: str | Path) -> LoadedModel:
    """A trained CEPrompt model (either stage) ready for inference, on the CPU, in eval mode."""
    tensors, meta, path = read_checkpoint(checkpoint)
    cfg = config_from_dict(meta["config"], where=f"{path} (recorded config)")
    class_names = list(meta["class_names"])
    if meta["stage"] == "eva":
        backbone = backbone_from_record(meta["backbone"], str(path))
        check_spec(backbone.spec, meta["clip_spec"], str(path))
        model: nn.Module = _stage1_model(cfg, backbone.clip, class_names, training=False)
        load_trainable(model, tensors, str(path))
    else:
        init = meta.get("init") or {}
        init_path = Path(init.get("path", ""))
        if not init_path.is_file():
            raise CheckpointError(f"{path}: its stage-1 checkpoint {init_path} is missing; restore it there")
        backbone = backbone_from_record(init["backbone"], str(init_path))
        check_spec(backbone.spec, meta["clip_spec"], str(path))
        _load_stage1_into(backbone, init_path)
        model = _stage2_model(cfg, backbone.clip, class_names)
        load_trainable(model, tensors, str(path))
    pre = Preprocess.from_dict(meta["preprocess"])
    return LoadedModel(model.eval(), meta, path, pre, class_names)


def preprocess_from_config(cfg: Config, spec: ClipSpec) -> Preprocess:
    return preprocess_for(spec.image_size, cfg.data.mean, cfg.data.std)
