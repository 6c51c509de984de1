"""Loading a user's pretrained CLIP from a local file or folder, in every format users have.

Supported, detected from the content rather than the file name:

* ``torchscript`` - OpenAI's published archives (``ViT-B-16.pt``, ``ViT-B-32.pt``, ``ViT-L-14.pt``).
* ``state_dict`` - an OpenAI/open_clip state dict saved with ``torch.save`` (``.pt``/``.bin``/``.pth``),
  optionally wrapped in ``{"state_dict": ...}`` and/or prefixed with ``module.``.
* ``safetensors`` - the same state dict as safetensors (``ceprompt convert`` writes these, with the
  architecture recorded in the file's metadata and a JSON sidecar).
* ``huggingface`` - a transformers CLIP folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), e.g. a local copy of ``openai/clip-vit-base-patch16``.

Pickle-based files are read with ``torch.load(weights_only=True)``; TorchScript archives are read as
data by :mod:`ceprompt.weights.torchscript_data` (their code never runs) and accepted only in OpenAI's layout.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP

from .. import __version__
from ..core.errors import CheckpointError
from ..core.io_utils import atomic_write_set, sha256_file
from ..core.paths import shown
from ..core.schema import SchemaError, expect, read_json
from ..model.clip import ClipSpec, build_clip, infer_spec
from .checkpoint import check_dtypes
from .torchscript_data import archive_tensors, check_zip_entries, read_archive

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "state_dict", "safetensors", "huggingface")
SPEC_METADATA_KEY = "ceprompt.clip_spec"
# Entries that archives carry beside the weights (OpenAI's metadata, open_clip's causal mask buffer).
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


@dataclass
class LoadedClip:
    """A CLIP model with the facts about where it came from."""

    model: CLIP
    spec: ClipSpec
    path: Path
    format: str


def detect_format(path: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` the file or folder at ``path`` is, judged by its content."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            return "huggingface"
        raise CheckpointError(
            f"{path}: a folder but not a Hugging Face CLIP folder (no config.json); "
            "give the weights file itself or a transformers CLIP folder"
        )
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive (a torch checkpoint cut short?)") from None
        if any("/code/" in n or n.startswith("code/") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "state_dict"
        raise CheckpointError(f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl inside)")
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's legacy (pre-1.6) format
        return "state_dict"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    raise CheckpointError(
        f"{path}: unknown format (not safetensors, a torch checkpoint, a TorchScript archive "
        "or a Hugging Face folder)"
    )


def _strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and drop DDP/compile prefixes."""
    for wrapper in ("state_dict", "model", "module"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            state_dict = inner
            break
    for prefix in ("module.", "_orig_mod.", "clip."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _torch_load(path: Path) -> Any:
    if zipfile.is_zipfile(path):  # torch's zip format: declared sizes are checked before torch inflates anything
        try:
            with zipfile.ZipFile(path) as archive:
                check_zip_entries(archive, str(path))
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types; all mean the same to the user here
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{path}: refused to unpickle: it holds Python objects other than tensors "
                f"({message[:200]}); ceprompt never runs code from a checkpoint"
            ) from None
        raise CheckpointError(f"{path}: cannot read the checkpoint ({message[:200]}); truncated or corrupt?") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state_dict = _strip_prefixes(obj)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {list(state_dict)[:8]})")
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc}); truncated or corrupt?") from None
    return _strip_prefixes(tensors), metadata


def _read_torchscript(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and activation of an OpenAI-layout TorchScript CLIP archive, read as data (nothing runs)."""
    state_dict, classes = archive_tensors(read_archive(str(path)))
    if "visual.conv1.weight" not in state_dict or "text_projection" not in state_dict:
        raise CheckpointError(
            f"{path}: a TorchScript archive that is not an OpenAI-layout CLIP; only OpenAI's CLIP archives "
            "(ViT-B-16.pt and the like) are accepted in this format"
        )
    gelu = classes.get("visual.transformer.resblocks.0.mlp.gelu", "QuickGELU")
    return state_dict, {"quick_gelu": gelu == "QuickGELU"}


def hf_to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) transformers ``CLIPModel`` weights to open_clip's ``CLIP`` names."""
    block_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        for tower, dst in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                           ("text_model.encoder.layers.", "transformer.resblocks.")):
            if key.startswith(tower):
                index, rest = key[len(tower):].split(".", 1)
                if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                    _, proj, kind = rest.split(".")
                    qkv.setdefault(f"{dst}{index}.attn.in_proj_{kind}", {})[proj] = value
                else:
                    for src_name, dst_name in block_names.items():
                        if rest.startswith(src_name + "."):
                            out[f"{dst}{index}.{dst_name}{rest[len(src_name):]}"] = value
                            break
                    else:
                        raise CheckpointError(f"unexpected Hugging Face CLIP weight {key!r}")
                break
        else:
            simple = {
                "vision_model.embeddings.class_embedding": "visual.class_embedding",
                "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias",
                "logit_scale": "logit_scale",
            }
            if key in simple:
                out[simple[key]] = value
            elif key == "visual_projection.weight":
                out["visual.proj"] = value.t().contiguous()
            elif key == "text_projection.weight":
                out["text_projection"] = value.t().contiguous()
            else:
                raise CheckpointError(f"unexpected Hugging Face CLIP weight {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise CheckpointError(f"incomplete attention weights for {key}: found only {sorted(parts)}")
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def _read_huggingface(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config_path = path / "config.json"
    try:
        config = read_json(config_path.read_bytes(), str(config_path))
        vision = expect(config, "vision_config", str(config_path), dict)
        text = expect(config, "text_config", str(config_path), dict)
    except OSError as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc.strerror or exc})") from None
    except SchemaError as exc:
        raise CheckpointError(f"{exc} (a Hugging Face CLIP config has vision_config and text_config)") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = path / name
        if weights.is_file():
            break
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    if detect_format(weights) == "safetensors":
        hf, _ = _read_safetensors(weights)
    else:
        hf = _read_state_dict(weights)
    hints: dict[str, Any] = {}
    try:
        for tower, section in (("vision", vision), ("text", text)):
            heads = expect(section, "num_attention_heads", f"{config_path} ({tower}_config)", int, lo=1, hi=4096,
                           optional=True)
            if heads is not None:
                hints[f"{tower}_heads"] = heads
        acts = {expect(section, "hidden_act", f"{config_path} ({tower}_config)", str, optional=True,
                       default="quick_gelu") for tower, section in (("vision", vision), ("text", text))}
    except SchemaError as exc:
        raise CheckpointError(str(exc)) from None
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise CheckpointError(f"{config_path}: unsupported activation(s) {sorted(acts)}; expected quick_gelu or gelu")
    hints["quick_gelu"] = acts == {"quick_gelu"}
    return hf_to_open_clip(hf), hints


def _sidecar_hints(path: Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Architecture recorded by ``ceprompt convert``: in safetensors metadata or a JSON sidecar."""
    raw = (metadata or {}).get(SPEC_METADATA_KEY)
    where = f"{path} (metadata)"
    sidecar = path.with_suffix(".json")
    try:
        if raw is None and sidecar.is_file():
            where = str(sidecar)
            raw = json.dumps(expect(read_json(sidecar.read_bytes(), where), "clip_spec", where, dict, optional=True))
        if raw in (None, "null"):
            return {}
        recorded = ClipSpec.from_dict(expect({"clip_spec": read_json(raw, where)}, "clip_spec", where, dict),
                                      where=where)
    except OSError as exc:
        raise CheckpointError(f"{sidecar}: unreadable sidecar ({exc.strerror or exc})") from None
    except SchemaError as exc:
        raise CheckpointError(str(exc)) from None
    return {"vision_heads": recorded.vision_heads, "text_heads": recorded.text_heads,
            "quick_gelu": recorded.quick_gelu}


def read_clip_weights(path: str | os.PathLike, quick_gelu: bool | None = None) -> tuple[dict[str, torch.Tensor], ClipSpec, str]:
    """open_clip-named weights, inferred architecture and detected format of a CLIP file or folder."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    hints: dict[str, Any] = {}
    if fmt == "torchscript":
        state_dict, hints = _read_torchscript(path)
    elif fmt == "huggingface":
        state_dict, hints = _read_huggingface(path)
    elif fmt == "safetensors":
        state_dict, metadata = _read_safetensors(path)
        hints = _sidecar_hints(path, metadata)
    else:
        state_dict = _read_state_dict(path)
        hints = _sidecar_hints(path)
    if quick_gelu is not None:
        hints["quick_gelu"] = quick_gelu
    state_dict = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in _NON_WEIGHTS}
    try:
        spec = infer_spec(state_dict, hints)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return state_dict, spec, fmt


def load_clip(path: str | os.PathLike, quick_gelu: bool | None = None) -> LoadedClip:
    """Build an fp32 open_clip CLIP from a local file or folder in any supported format.

    ``quick_gelu`` overrides the activation where the file does not record it (plain state dicts
    default to QuickGELU, as OpenAI's CLIPs use).
    """
    state_dict, spec, fmt = read_clip_weights(path, quick_gelu)
    model = build_clip(spec)
    check_dtypes({k: v for k, v in state_dict.items() if k in model.state_dict()}, str(path))
    state_dict = {k: v.float() for k, v in state_dict.items()}
    if "logit_scale" not in state_dict:
        state_dict["logit_scale"] = model.logit_scale.detach().clone()
    state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the inferred architecture ({spec.describe()}): "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded CLIP %s (%s) from %s", spec.describe(), fmt, shown(path))
    return LoadedClip(model=model.eval(), spec=spec, path=Path(path), format=fmt)


def save_clip_safetensors(
    model: CLIP, spec: ClipSpec, dst: str | os.PathLike, source: dict[str, Any] | None = None
) -> Path:
    """Write ``dst`` (.safetensors, spec in its metadata) and ``dst`` with .json (the sidecar), atomically."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output file must end in .safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {SPEC_METADATA_KEY: json.dumps(spec.to_dict()), "format": "pt"}
    sidecar_path = dst.with_suffix(".json")
    # the sidecar describes (source, hashes) the weights beside it: both are replaced as a set, the sidecar last
    with atomic_write_set([dst, sidecar_path], commit=sidecar_path) as tmp:
        save_file(tensors, str(tmp[dst]), metadata=metadata)
        sidecar = {"kind": "clip", "ceprompt_version": __version__, "clip_spec": spec.to_dict(),
                   "sha256": sha256_file(tmp[dst]), "source": source or {}}
        tmp[sidecar_path].write_text(json.dumps(sidecar, indent=2) + "\n")
    return dst


def convert_clip(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False,
                 quick_gelu: bool | None = None) -> LoadedClip:
    """``ceprompt convert``: any supported CLIP file to a plain safetensors copy plus JSON sidecar."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output file must end in .safetensors")
    for target in (dst, dst.with_suffix(".json")):
        if target.exists() and not overwrite:
            raise CheckpointError(f"{target}: already exists; pass --overwrite to replace it")
    loaded = load_clip(src, quick_gelu=quick_gelu)
    src_path = Path(src)
    source = {"path": str(src_path.resolve()), "format": loaded.format}
    if src_path.is_file():
        source["sha256"] = sha256_file(src_path)
    save_clip_safetensors(loaded.model, loaded.spec, dst, source)
    return loaded
