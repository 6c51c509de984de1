"""Checkpoints: trainable weights as safetensors with their description, and resume state.

A checkpoint is ``NAME.safetensors`` holding only the weights the stage trains, with the
description (stage, classes, prompts, preprocessing, backbone, resolved config, version) in
the file's own metadata - so one atomic rename publishes weights and description together -
and the same description as a readable JSON sidecar ``NAME.json``.

Resume state (``resume.pt``) is a ``torch.save`` dict of tensors and plain values that loads
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..core.errors import CheckpointError, TrainingError
from ..core.io_utils import atomic_write
from ..core.schema import SchemaError, expect, read_json
from ..data.class_names import MAX_CLASSES
from ..data.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .torchscript_data import check_zip_entries

META_KEY = "ceprompt.meta"
CONTENT_KEY = "ceprompt.content"  # SHA-256 of the description and the tensors (names, dtypes, shapes, bytes)
KIND = "ceprompt-checkpoint"
RESUME_NAME = "resume.pt"
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


# Weights are real floating-point numbers. A complex NaN passes isfinite's float check; bool and integer
# tensors would be cast and used as if they were weights; fp8 is no format any CLIP ships.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_dtypes(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights that are not real floating-point tensors, naming the first."""
    for key, value in tensors.items():
        if value.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: {key} is {str(value.dtype).removeprefix('torch.')}; weights must be "
                                  "fp16, bf16, fp32 or fp64")


def check_header_dtypes(fh: Any, where: str, keys: Any = None) -> None:
    """:func:`check_dtypes` from an open safetensors file's header, before any tensor is read."""
    for key in keys if keys is not None else fh.keys():
        dtype = fh.get_slice(key).get_dtype()
        if dtype not in SAFETENSORS_WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: {key} is {dtype}; weights must be F16, BF16, F32 or F64")


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding inf or NaN."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    dtype: torch.dtype = torch.float32) -> Path:
    """Weights plus description; refuses non-finite weights; a failed write leaves the old file intact."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = non_finite(tensors)
    if bad:
        raise TrainingError(f"{path}: refusing to save non-finite weights ({', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''})")
    meta = {"kind": KIND, "ceprompt_version": __version__, **meta}
    text = json.dumps(meta, indent=2, default=str, allow_nan=False)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    digest = content_digest(tensors, text)
    # safetensors writes its metadata in no fixed order, so the same checkpoint saved again (a resumed run that
    # finds no better epoch, the same temperature) would get another file hash, and the stage-2 runs that recorded
    # the hash would need a kept copy; an unchanged checkpoint is therefore not written again
    if stored_digest(path) == digest and path.with_suffix(".json").is_file():
        return path
    try:
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: text, "format": "pt", CONTENT_KEY: digest})
        with atomic_write(path.with_suffix(".json")) as tmp:
            tmp.write_text(text + "\n")
    except OSError as exc:
        raise TrainingError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); the previous file, "
                            "if any, is intact") from None
    return path


def content_digest(tensors: dict[str, torch.Tensor], text: str) -> str:
    import hashlib

    h = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        value = tensors[key]
        h.update(f"\0{key}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def stored_digest(path: Path) -> str | None:
    """The content digest a checkpoint written by :func:`save_checkpoint` records (its header only), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return (fh.metadata() or {}).get(CONTENT_KEY)
    except Exception:  # unreadable: written again
        return None


def kept_copy(path: Path, sha256: str) -> Path:
    """Where a checkpoint that a resumed run replaces is kept, named by its hash: the runs built on it record
    that hash, and find the file there (``best.safetensors`` -> ``best-0123456789ab.safetensors``)."""
    return path.with_name(f"{path.stem}-{sha256[:12]}{path.suffix}")


# In a folder: a run directory's best, else last checkpoint; an imported model's latest stage; a demo folder's
# stage 2 (of its first seed, with --seeds).
FOLDER_CHECKPOINTS = ("checkpoints/best.safetensors", "checkpoints/last.safetensors", "stage2.safetensors",
                      "stage1.safetensors", "stage2/checkpoints/best.safetensors",
                      "seed-*/stage2/checkpoints/best.safetensors")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``.safetensors`` file, its ``.json`` sidecar, or a folder (see :data:`FOLDER_CHECKPOINTS`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for pattern in FOLDER_CHECKPOINTS:
            found = sorted(f for f in path.glob(pattern) if f.is_file())
            if found:
                return found[0]
        if (path / "model.safetensors").is_file() and not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: an `export hub` into this folder was interrupted (model.safetensors "
                                  "without the config.json written last); export it again with --overwrite")
        raise CheckpointError(f"{path}: no checkpoint inside (looked for {', '.join(FOLDER_CHECKPOINTS)})")
    if path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        raise CheckpointError(f"{path}: an image or video, not a model; the model comes first, as in "
                              "`ceprompt predict MODEL PHOTOS...`")
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(weights, description, resolved path) of a ceprompt checkpoint."""
    from safetensors import safe_open

    resolved = resolve_checkpoint(path)
    try:
        with safe_open(str(resolved), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            check_header_dtypes(fh, str(resolved))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{resolved}: not a readable safetensors checkpoint ({exc})") from None
    if raw is None:
        raise CheckpointError(
            f"{resolved}: no ceprompt description in the file; this looks like plain weights "
            "(a CLIP backbone goes in backbone.path, not here)"
        )
    try:
        meta = read_json(raw, f"{resolved} (description)")
    except SchemaError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{resolved}: kind {kind!r} is not a ceprompt checkpoint")
    validate_meta(meta, str(resolved))
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{resolved}: holds non-finite weights ({', '.join(bad[:3])})")
    return tensors, meta, resolved


def _fail(where: str, key: str, expected: str, value: Any) -> None:
    raise CheckpointError(f"{where}: description field {key}={str(value)[:80]!r}; expected {expected}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_IMAGE_SIZE = 1024  # CLIP inputs are 224-448 px; a declared size above this is a crafted file


def validate_meta(meta: dict[str, Any], where: str) -> None:
    """Every field inference relies on, checked once, with one line per problem."""
    from ..model.clip import ClipSpec
    from ..model.stages import STAGES

    if meta.get("stage") not in STAGES:
        _fail(where, "stage", f"one of {STAGES}", meta.get("stage"))
    names = meta.get("class_names")
    if (not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES
            or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names)):
        _fail(where, "class_names", f"a list of 2 to {MAX_CLASSES} distinct, non-empty names", names)
    for key in ("config", "clip_spec", "preprocess", "backbone"):
        if not isinstance(meta.get(key), dict):
            _fail(where, key, "a mapping", meta.get(key))
    spec = meta["clip_spec"]
    for key, value in spec.items():
        if key.endswith(("_ratio",)) and not (_finite_number(value) and value > 0):
            _fail(where, f"clip_spec.{key}", "a positive number", value)
        elif key != "quick_gelu" and not key.endswith("_ratio") and not (
                isinstance(value, int) and not isinstance(value, bool) and value > 0):
            _fail(where, f"clip_spec.{key}", "a positive integer", value)
    ClipSpec.from_dict(spec, where=f"{where} (clip_spec)").validate(where)
    if spec.get("image_size", 0) > MAX_IMAGE_SIZE:
        _fail(where, "clip_spec.image_size", f"at most {MAX_IMAGE_SIZE} px", spec.get("image_size"))
    pre = meta["preprocess"]
    if pre.get("image_size") != spec.get("image_size"):  # the crops must be the model's input, whatever is declared
        _fail(where, "preprocess.image_size", f"the model's input size, {spec.get('image_size')} px",
              pre.get("image_size"))
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_finite_number(x) for x in v)
                and (key == "mean" or all(x > 0 for x in v))):
            _fail(where, f"preprocess.{key}", "3 finite numbers" + (" > 0" if key == "std" else ""), v)
    if pre.get("interpolation", "bicubic") not in INTERPOLATIONS:
        _fail(where, "preprocess.interpolation", f"one of {INTERPOLATIONS}", pre.get("interpolation"))
    if pre.get("resize", "square") not in ("square", "shorter"):
        _fail(where, "preprocess.resize", "square or shorter", pre.get("resize"))
    calibration = meta.get("calibration")
    if calibration is not None:
        t = calibration.get("temperature") if isinstance(calibration, dict) else calibration
        if not (_finite_number(t) and 0 < t <= 1e4):
            _fail(where, "calibration.temperature", "a positive finite number", t)


def save_resume(run_dir: Path, state: dict[str, Any]) -> Path:
    try:
        with atomic_write(run_dir / RESUME_NAME) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        raise TrainingError(f"{run_dir / RESUME_NAME}: cannot write the resume state "
                            f"({str(exc).splitlines()[0][:160]}); the previous one is intact") from None
    return run_dir / RESUME_NAME


def load_resume(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESUME_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no resume state (the run has not finished an epoch yet)")
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_entries(archive, str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read resume state ({str(exc).splitlines()[0][:200]})") from None
    try:
        check_resume_state(state, str(path))
    except SchemaError as exc:
        raise CheckpointError(f"{exc} (not the resume state ceprompt writes; start the run again without --resume)"
                              ) from None
    return state


MAX_EPOCHS = 100_000  # as optim.epochs accepts


def check_resume_state(state: Any, where: str) -> None:
    """The fields of ``resume.pt`` a resumed run uses, of the type and range ceprompt writes them: checked by the
    one schema reader before any of them is used."""
    if not isinstance(state, dict):
        raise SchemaError(f"{where}: expected a mapping of saved values, found {type(state).__name__}")
    epoch = expect(state, "epoch", where, int, lo=1, hi=MAX_EPOCHS)
    expect(state, "best_accuracy", where, (int, float), lo=0, hi=1)
    expect(state, "best_epoch", where, int, lo=0, hi=epoch)
    expect(state, "optimizer_name", where, str)
    for key in ("optimizer", "scaler"):
        expect(state, key, where, dict)
    for key in ("model_config", "teacher_cache"):
        expect(state, key, where, dict, optional=True)
    model = expect(state, "model", where, dict)
    bad = [k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SchemaError(f"{where}: model holds {str(bad[0])[:60]!r}, which is not a named tensor")
