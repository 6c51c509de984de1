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
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CheckpointError
from ..io_utils import atomic_write

META_KEY = "ceprompt.meta"
KIND = "ceprompt-checkpoint"
RESUME_NAME = "resume.pt"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"kind": KIND, "ceprompt_version": __version__, **meta}
    text = json.dumps(meta, indent=2, default=str)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: text, "format": "pt"})
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(text + "\n")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``.safetensors`` file, its ``.json`` sidecar, or a run directory (its best, else last checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best", "last"):
            candidate = path / "checkpoints" / f"{name}.safetensors"
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.safetensors or checkpoints/last.safetensors inside")
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
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{resolved}: not a readable safetensors checkpoint ({exc})") from None
    if raw is None:
        raise CheckpointError(
            f"{resolved}: no ceprompt description in the file; this looks like plain weights "
            "(a CLIP backbone goes in backbone.path, not here)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{resolved}: corrupt description ({exc})") from None
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{resolved}: kind {meta.get('kind')!r} is not a ceprompt checkpoint")
    return tensors, meta, resolved


def save_resume(run_dir: Path, state: dict[str, Any]) -> Path:
    with atomic_write(run_dir / RESUME_NAME) as tmp:
        torch.save(state, tmp)
    return run_dir / RESUME_NAME


def load_resume(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESUME_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no resume state (the run has not finished an epoch yet)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read resume state ({str(exc).splitlines()[0][:200]})") from None
