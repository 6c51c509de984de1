"""The authors' released CEPrompt checkpoints, checked and rewritten as ordinary ceprompt checkpoints.

What the files hold is described key by key in ``docs/authors-checkpoints.md``: plain state dicts (stage 1:
the whole vision tower with ``projection_dist`` for the projection; stage 2: that tower, the text
tower as ``text_encoder.*`` and the prompt learner with its two prompt buffers). Here they are read
with ``weights_only=True``, every key and shape is checked against the schema the given CLIP implies,
and the facts that hold for genuine files are verified: frozen tensors equal the CLIP file, a stage-2
file's vision tower equals its stage-1 file, and the prompt buffers are the word embeddings of the
dataset's prompts (which also reveals the class words a file was trained with).

The result is ``OUT/stage1.safetensors`` (and ``OUT/stage2.safetensors``) with JSON sidecars, in the
authors-compatible mode (``compat: authors``), recording the source files and their SHA-256.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError, ConfigError
from ..core.io_utils import verified_sha256
from ..core.owned_dirs import OwnedDir
from ..data.datasets import class_names_of
from ..experiment.config import AUTHORS_PROMPT_NAMES, load_config
from ..model.clip import ClipSpec, get_tokenizer, tokenize
from ..model.trainable import load_trainable
from .build import (
    BuiltModel,
    _load_base_into,
    build_stage,
    checkpoint_meta,
    load_backbone,
    preprocess_from_config,
)
from .checkpoint import read_checkpoint, save_checkpoint
from .clip_files import _strip_prefixes, _torch_load

log = logging.getLogger(__name__)
DATASETS = ("rafdb", "affectnet7", "affectnet8")
FIX_LAYER = 2  # the authors train vision blocks 2.. in stage 1 (their fix_layer)
SOT, EOT = 49406, 49407


# --- the schema: every key and shape a file must hold, derived from the CLIP it was trained on ----------

def _block(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}attn.in_proj_weight": (3 * width, width), f"{prefix}attn.in_proj_bias": (3 * width,),
        f"{prefix}attn.out_proj.weight": (width, width), f"{prefix}attn.out_proj.bias": (width,),
        f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,),
        f"{prefix}mlp.c_fc.weight": (mlp, width), f"{prefix}mlp.c_fc.bias": (mlp,),
        f"{prefix}mlp.c_proj.weight": (width, mlp), f"{prefix}mlp.c_proj.bias": (width,),
        f"{prefix}ln_2.weight": (width,), f"{prefix}ln_2.bias": (width,),
    }


def vision_schema(spec: ClipSpec) -> dict[str, tuple[int, ...]]:
    """The stage-1 file: the whole vision tower under the authors' names."""
    w, p = spec.vision_width, spec.patch_size
    keys = {"conv1.weight": (w, 3, p, p), "class_embedding": (w,),
            "positional_embedding": (spec.num_patches + 1, w), "ln_pre.weight": (w,), "ln_pre.bias": (w,)}
    for i in range(spec.vision_layers):
        keys.update(_block(f"transformer.resblocks.{i}.", w, round(w * spec.vision_mlp_ratio)))
    keys.update({"ln_post.weight": (w,), "ln_post.bias": (w,), "projection_dist": (w, spec.embed_dim)})
    return keys


def text_schema(spec: ClipSpec) -> dict[str, tuple[int, ...]]:
    w = spec.text_width
    keys = {"text_encoder.positional_embedding": (spec.context_length, w)}
    for i in range(spec.text_layers):
        keys.update(_block(f"text_encoder.transformer.resblocks.{i}.", w, round(w * spec.text_mlp_ratio)))
    keys.update({"text_encoder.ln_final.weight": (w,), "text_encoder.ln_final.bias": (w,),
                 "text_encoder.text_projection": (w, spec.embed_dim)})
    return keys


def prompt_schema(spec: ClipSpec, n_classes: int, n_ctx: int, depth: int, invariant: bool
                  ) -> dict[str, tuple[int, ...]]:
    tw, vw = spec.text_width, spec.vision_width
    keys = {"prompt_learner.ctx": (n_ctx, tw), "prompt_learner.proj.weight": (vw, tw), "prompt_learner.proj.bias": (vw,),
            "prompt_learner.token_prefix": (n_classes, 1, tw),
            "prompt_learner.token_suffix": (n_classes, spec.context_length - 1 - n_ctx - int(invariant), tw)}
    if invariant:
        keys["prompt_learner.ctx_invariant"] = (1, tw)
    for j in range(depth - 1):
        keys[f"prompt_learner.compound_prompts_text.{j}"] = (n_ctx, tw)
        keys[f"prompt_learner.compound_prompt_projections.{j}.weight"] = (vw, tw)
        keys[f"prompt_learner.compound_prompt_projections.{j}.bias"] = (vw,)
    return keys


def stage2_schema(spec: ClipSpec, n_classes: int, n_ctx: int = 2, depth: int = 9, invariant: bool = False
                  ) -> dict[str, tuple[int, ...]]:
    return {**vision_schema(spec), **text_schema(spec), **prompt_schema(spec, n_classes, n_ctx, depth, invariant)}


def _frozen_vision_keys(spec: ClipSpec) -> list[str]:
    return ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
            *[k for k in vision_schema(spec) if k.startswith(tuple(f"transformer.resblocks.{i}." for i in range(FIX_LAYER)))]]


def to_open_clip(key: str) -> str:
    """The open_clip name of an authors' tower key (``projection_dist`` is the vision projection)."""
    if key.startswith("text_encoder."):
        return key[len("text_encoder."):]
    return "visual.proj" if key == "projection_dist" else f"visual.{key}"


PROMPT_NAMES = {"prompt_learner.ctx": "prompt_learner.ctx", "prompt_learner.ctx_invariant": "prompt_learner.invariant"}


def to_ceprompt_prompt(key: str) -> str | None:
    """The ceprompt name of a prompt-learner tensor; None for what ceprompt does not use (``proj``,
    which the authors' forward computes and discards, and the two prompt buffers, rebuilt from words)."""
    if key in PROMPT_NAMES:
        return PROMPT_NAMES[key]
    parts = key.split(".")
    if parts[1] == "compound_prompts_text":
        return f"prompt_learner.deep_text.{parts[2]}"
    if parts[1] == "compound_prompt_projections":
        return f"prompt_learner.vision_maps.{parts[2]}.{parts[3]}"
    return None


# --- reading and checking -------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (optionally ``module.``-prefixed), floats only, read without running any code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state = _strip_prefixes(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]!r} is not a floating-point tensor; expected the authors' weights")
    return state


def check_schema(state: dict[str, torch.Tensor], schema: dict[str, tuple[int, ...]], path: Path, what: str) -> None:
    missing = [k for k in schema if k not in state]
    unexpected = [k for k in state if k not in schema]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {schema[k]})" for k in schema
             if k in state and tuple(state[k].shape) != schema[k]]
    problems = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else []) + \
        ([f"wrong shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{path}: not the authors' {what} for this CLIP ({len(schema)} tensors expected): "
                              + "; ".join(problems))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, compared at the lower of the two precisions (files may be fp16 where the CLIP is fp32)."""
    dtype = a.dtype if a.element_size() <= b.element_size() else b.dtype
    return torch.equal(a.to(dtype), b.to(dtype))


def _first_difference(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[str, float] | None:
    for key, a, b in pairs:
        if not same(a, b):
            return key, float((a.float() - b.float()).abs().max())
    return None


def prompt_texts(words: list[str], invariant: bool, n_ctx: int, ctx_init: str = "a photo of") -> list[str]:
    """The stage-2 prompts the authors' code tokenises: ``a photo of {word}.`` or ``X X X {word}.``."""
    prefix = " ".join(["X"] * (1 + n_ctx)) if invariant else ctx_init
    return [f"{prefix} {w}." for w in words]


def expected_buffers(embedding: torch.Tensor, words: list[str], invariant: bool, n_ctx: int,
                     context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(prompt_texts(words, invariant, n_ctx), context_length)
    rows = embedding[ids]
    return rows[:, :1], rows[:, 1 + n_ctx + int(invariant):]


def words_in_file(suffix: torch.Tensor, embedding: torch.Tensor, invariant: bool) -> list[str]:
    """The class word of every prompt in a ``token_suffix`` buffer, read back from the embedding table."""
    decoder = get_tokenizer().decoder
    position = 0 if invariant else 1  # after "of" in "a photo of {word}."
    out = []
    for row in suffix[:, position]:
        match = (embedding.to(row.dtype) == row).all(dim=1).nonzero()
        out.append(decoder[int(match[0])].replace("</w>", "") if len(match) else "?")
    return out


# --- import ------------------------------------------------------------------------------------------------

@dataclass
class Imported:
    stage1: Path
    stage2: Path | None
    class_words: list[str]


def _source(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "sha256": verified_sha256(path)}


def import_official(clip: str | os.PathLike, stage1: str | os.PathLike, dataset: str, out: str | os.PathLike,
                    stage2: str | os.PathLike | None = None, overwrite: bool = False) -> Imported:
    """Check the authors' files against ``clip`` and write ceprompt checkpoints into ``out``."""
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: the authors' checkpoints exist for {', '.join(DATASETS)}")
    s1_path, s2_path = Path(stage1).expanduser(), Path(stage2).expanduser() if stage2 else None
    owned = OwnedDir(Path(out), "imported model folder", lambda p: (p / "stage1.safetensors").exists(), overwrite,
                     elsewhere="choose another folder with --out")
    owned.plan()
    cfg1 = load_config(f"{dataset}_stage1", values={"compat": "authors", "backbone.path": clip})
    backbone = load_backbone(cfg1.backbone)
    spec, weights = backbone.spec, backbone.clip.state_dict()
    classes = class_names_of(dataset)
    words = AUTHORS_PROMPT_NAMES[dataset]

    s1 = read_state_dict(s1_path)
    check_schema(s1, vision_schema(spec), s1_path, "stage-1 file")
    diff = _first_difference([(k, s1[k], weights[to_open_clip(k)]) for k in _frozen_vision_keys(spec)])
    if diff:
        raise CheckpointError(f"{s1_path}: frozen tensor {diff[0]} differs from {backbone.record['path']} (by up to "
                              f"{diff[1]:.2e}); the file was trained on another CLIP: pass the one it was made with")
    s2 = None
    if s2_path is not None:
        s2 = read_state_dict(s2_path)
        ctx = s2.get("prompt_learner.ctx")
        if ctx is None or ctx.ndim != 2:
            raise CheckpointError(f"{s2_path}: no prompt_learner.ctx (n_ctx x width); not an authors' stage-2 file")
        invariant = "prompt_learner.ctx_invariant" in s2
        depth = 1 + sum(k.startswith("prompt_learner.compound_prompts_text.") for k in s2)
        check_schema(s2, stage2_schema(spec, len(classes), ctx.shape[0], depth, invariant), s2_path, "stage-2 file")
        diff = _first_difference([(k, s2[k], s1[k]) for k in vision_schema(spec)])
        if diff:
            raise CheckpointError(f"{s2_path}: its vision tower differs from {s1_path} at {diff[0]} (by up to "
                                  f"{diff[1]:.2e}); the stage-2 file was not trained from this stage-1 file")
        diff = _first_difference([(k, s2[k], weights[to_open_clip(k)]) for k in text_schema(spec)])
        if diff:
            raise CheckpointError(f"{s2_path}: text tower tensor {diff[0]} differs from {backbone.record['path']}; "
                                  "the file was trained on another CLIP")
        _check_buffers(s2, s2_path, weights["token_embedding.weight"], words, dataset, invariant, ctx.shape[0],
                       spec.context_length)

    with owned.replacing() as folder:
        imported = _write(folder, cfg1, backbone, classes, s1, s1_path, s2, s2_path, dataset)
    log.info("imported %s into %s", ", ".join(str(p) for p in (s1_path, s2_path) if p), folder)
    return imported


def _check_buffers(s2: dict[str, torch.Tensor], path: Path, embedding: torch.Tensor, words: list[str], dataset: str,
                   invariant: bool, n_ctx: int, context_length: int) -> None:
    prefix, suffix = expected_buffers(embedding, words, invariant, n_ctx, context_length)
    if same(s2["prompt_learner.token_prefix"], prefix) and same(s2["prompt_learner.token_suffix"], suffix):
        return
    found = words_in_file(s2["prompt_learner.token_suffix"], embedding, invariant)
    fits = [name for name, ws in AUTHORS_PROMPT_NAMES.items() if ws == found and name in DATASETS]
    hint = f" (they are {fits[0]}'s: pass --dataset {fits[0]})" if fits else ""
    raise CheckpointError(f"{path}: its prompts hold the class words {', '.join(found)}; --dataset {dataset} "
                          f"expects {', '.join(words)}{hint}")


def _write(folder: Path, cfg1: Any, backbone: Any, classes: list[str], s1: dict[str, torch.Tensor], s1_path: Path,
           s2: dict[str, torch.Tensor] | None, s2_path: Path | None, dataset: str) -> Imported:
    clip_source = {k: backbone.record[k] for k in ("path", "sha256", "name") if backbone.record.get(k)}
    sources = {"clip": clip_source, "stage1": _source(s1_path)}
    model1 = build_stage(cfg1, backbone.clip, classes)
    trained = {n for n in model1.trainable_state_dict()}
    tensors1 = {to_open_clip(k): v.float() for k, v in s1.items() if to_open_clip(k) in trained}
    load_trainable(model1, tensors1, str(s1_path))
    built1 = BuiltModel(model1, backbone.spec, backbone.record, None)
    meta1 = checkpoint_meta(cfg1, built1, classes, preprocess_from_config(cfg1, backbone.spec), folder=folder,
                            imported_from={k: v for k, v in sources.items() if k != "stage2"})
    stage1_out = save_checkpoint(folder / "stage1.safetensors", tensors1, meta1)
    stage2_out = None
    if s2 is not None and s2_path is not None:
        sources["stage2"] = _source(s2_path)
        invariant = "prompt_learner.ctx_invariant" in s2
        n_ctx = s2["prompt_learner.ctx"].shape[0]
        depth = 1 + sum(k.startswith("prompt_learner.compound_prompts_text.") for k in s2)
        cfg2 = load_config(f"{dataset}_stage2", values={"compat": "authors", "cat.n_ctx": n_ctx,
                                                        "cat.prompt_depth": depth, "cat.invariant_token": invariant,
                                                        "backbone.init": stage1_out})
        fresh = load_backbone(cfg1.backbone, sha256=backbone.record["sha256"])
        init = _load_base_into(fresh, read_checkpoint(stage1_out), cfg1.stage)
        model2 = build_stage(cfg2, fresh.clip, classes)
        tensors2 = {}
        for key, value in s2.items():
            name = to_ceprompt_prompt(key) if key.startswith("prompt_learner.") else None
            if name is not None:
                tensors2[name] = value.float()
        load_trainable(model2, tensors2, str(s2_path))
        built2 = BuiltModel(model2, fresh.spec, fresh.record, init)
        meta2 = checkpoint_meta(cfg2, built2, classes, preprocess_from_config(cfg2, fresh.spec), folder=folder,
                                imported_from=sources)
        stage2_out = save_checkpoint(folder / "stage2.safetensors", tensors2, meta2)
    return Imported(stage1_out, stage2_out, AUTHORS_PROMPT_NAMES[dataset])
