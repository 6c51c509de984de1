"""CLIP architecture description, named configs, model construction and tokenizer.

The towers themselves are open_clip's classes; this module only describes their
shape (:class:`ClipSpec`), knows the named architectures (real ones and tiny ones
for tests and the demo), infers the shape of a state dict, and builds the model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from ..core.errors import CheckpointError

# OpenAI and open_clip ViT CLIPs all use 64-dimensional attention heads; a plain
# state dict does not record the head count, so this convention fills it in.
HEAD_WIDTH = 64
# No recorded size of a CLIP (width, depth, tokens, vocabulary, pixels) is anywhere near this; a larger one is a
# crafted description, refused before it allocates anything.
MAX_SIZE = 1 << 20


@dataclass(frozen=True)
class ClipSpec:
    """Shape of a ViT CLIP: everything needed to rebuild it before loading weights."""

    embed_dim: int  # joint image-text embedding size (output of both projections)
    image_size: int  # square input resolution in pixels
    patch_size: int  # side of a square patch; image_size // patch_size patches per side
    vision_width: int  # vision transformer token width
    vision_layers: int  # number of vision residual blocks
    vision_heads: int  # attention heads per vision block
    text_width: int  # text transformer token width
    text_layers: int  # number of text residual blocks
    text_heads: int  # attention heads per text block
    context_length: int = 77  # text positions, including start and end tokens
    vocab_size: int = 49408  # BPE vocabulary size of the token embedding
    vision_mlp_ratio: float = 4.0  # MLP hidden width / vision width
    text_mlp_ratio: float = 4.0  # MLP hidden width / text width
    quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU, not exact GELU

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> "ClipSpec":
        """A spec read back from a file: every field present, of its type, in a range a CLIP can have."""
        from ..core.schema import SchemaError, expect

        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: the CLIP spec is a {type(data).__name__}; expected an object")
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{where}: unknown CLIP spec field(s) {unknown}; expected {sorted(names)}")
        values: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                optional = f.default is not dataclasses.MISSING
                if f.type in (bool, "bool"):
                    values[f.name] = expect(dict(data), f.name, where, bool, optional=optional, default=f.default)
                elif f.type in (float, "float"):
                    values[f.name] = expect(dict(data), f.name, where, (int, float), lo=1e-3, hi=64,
                                            optional=optional, default=f.default)
                else:
                    values[f.name] = expect(dict(data), f.name, where, int, lo=1, hi=MAX_SIZE, optional=optional,
                                            default=f.default)
        except SchemaError as exc:
            raise CheckpointError(f"{exc} (a CLIP spec field)") from None
        return cls(**values)

    def validate(self, where: str = "spec") -> "ClipSpec":
        """Refuse shapes no CLIP can have (a crafted or corrupted description)."""
        problems = [
            (self.vision_heads < 1 or self.vision_width % self.vision_heads, "vision width divisible by vision_heads"),
            (self.text_heads < 1 or self.text_width % self.text_heads, "text width divisible by text_heads"),
            (self.patch_size < 1 or self.image_size % self.patch_size, "image_size divisible by patch_size"),
            (min(self.embed_dim, self.vision_layers, self.text_layers, self.context_length, self.vocab_size) < 1,
             "positive sizes"),
        ]
        for bad, expected in problems:
            if bad:
                raise CheckpointError(f"{where}: impossible CLIP shape ({self.describe()}); expected {expected}")
        return self

    def describe(self) -> str:
        return (
            f"ViT {self.image_size}px/{self.patch_size} width {self.vision_width} x{self.vision_layers}, "
            f"text width {self.text_width} x{self.text_layers}, embed {self.embed_dim}, "
            f"{'QuickGELU' if self.quick_gelu else 'GELU'}"
        )


_B16 = ClipSpec(
    embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
    text_width=512, text_layers=12, text_heads=8,
)

# Named architectures, looked up by `build_clip` and `--set backbone.arch=...`.
# The tiny ones are registered exactly like the real ones so that every code path
# the real models take is exercised by the tests and the demo on a CPU.
ARCHS: dict[str, ClipSpec] = {
    "ViT-B-16": _B16,
    "ViT-B-32": dataclasses.replace(_B16, patch_size=32),
    "ViT-L-14": ClipSpec(
        embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        text_width=768, text_layers=12, text_heads=12,
    ),
    # Vision and text widths differ on purpose: it catches code that assumes they match.
    "tiny-vit": ClipSpec(
        embed_dim=64, image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=2,
        text_width=64, text_layers=4, text_heads=1,
    ),
    # The demo's CLIP, pretrained in minutes on a CPU (ceprompt.demo): 16-pixel patches learn several
    # times faster from scratch than 8-pixel ones at this size; 32 tokens hold every demo caption.
    "demo-vit": ClipSpec(
        embed_dim=64, image_size=64, patch_size=16, vision_width=128, vision_layers=4, vision_heads=2,
        text_width=64, text_layers=4, text_heads=1, context_length=32,
    ),
    "tiny-vit-12": ClipSpec(
        embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=12, vision_heads=1,
        text_width=64, text_layers=12, text_heads=1,
    ),
}


def get_arch(name: str) -> ClipSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise CheckpointError(f"unknown CLIP architecture {name!r}; known: {', '.join(ARCHS)}") from None


def build_clip(spec: ClipSpec | str, seed: int | None = None) -> CLIP:
    """An fp32 open_clip CLIP of the given shape with random weights (open_clip's init)."""
    if isinstance(spec, str):
        spec = get_arch(spec)
    vision = CLIPVisionCfg(
        layers=spec.vision_layers,
        width=spec.vision_width,
        head_width=spec.vision_width // spec.vision_heads,
        mlp_ratio=spec.vision_mlp_ratio,
        patch_size=spec.patch_size,
        image_size=spec.image_size,
    )
    text = CLIPTextCfg(
        context_length=spec.context_length,
        vocab_size=spec.vocab_size,
        width=spec.text_width,
        heads=spec.text_heads,
        layers=spec.text_layers,
        mlp_ratio=spec.text_mlp_ratio,
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = CLIP(spec.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=spec.quick_gelu)
    return model.float().eval()


def _count_blocks(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"blocks under {prefix!r} are not numbered 0..n-1: found {sorted(found)}")
    return len(found)


def _heads(width: int, hint: int | None, tower: str) -> int:
    if hint is not None:
        if width % hint:
            raise CheckpointError(f"{tower} width {width} is not divisible by {hint} attention heads")
        return hint
    if width % HEAD_WIDTH:
        raise CheckpointError(
            f"{tower} width {width} is not a multiple of {HEAD_WIDTH}, so its head count cannot be inferred; "
            "give it in a JSON sidecar (written by `ceprompt convert`)"
        )
    return width // HEAD_WIDTH


REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)


def infer_spec(state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None) -> ClipSpec:
    """Read a CLIP's shape from its open_clip-named weights.

    ``hints`` supplies what weights cannot tell (``vision_heads``, ``text_heads``,
    ``quick_gelu``) when a config file records it; anything else in the hints must
    agree with the weights.
    """
    hints = dict(hints or {})
    keys = list(state_dict)
    if any(k.startswith("visual.layer1.") for k in keys):
        raise CheckpointError("this is a ResNet CLIP; CEPrompt needs a ViT CLIP (e.g. ViT-B/16)")
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise CheckpointError(
            f"not a CLIP checkpoint: missing {', '.join(missing)} (it holds {len(keys)} tensors: {sample})"
        )
    conv = state_dict["visual.conv1.weight"]
    vision_width, _, patch, _ = conv.shape
    n_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointError(f"visual.positional_embedding has {n_pos} rows; expected 1 + a square number")
    vision_proj = state_dict["visual.proj"]
    text_proj = state_dict["text_projection"]
    if vision_proj.shape[0] != vision_width:
        raise CheckpointError(
            f"visual.proj takes width {vision_proj.shape[0]} but the vision tower has width {vision_width}"
        )
    text_width = state_dict["ln_final.weight"].shape[0]
    if text_proj.shape[0] != text_width:
        raise CheckpointError(f"text_projection takes width {text_proj.shape[0]} but the text tower has width {text_width}")
    if vision_proj.shape[1] != text_proj.shape[1]:
        raise CheckpointError(
            f"mismatched vision/text embedding widths: visual.proj outputs {vision_proj.shape[1]} "
            f"but text_projection outputs {text_proj.shape[1]}"
        )
    vision_layers = _count_blocks(keys, "visual.transformer.resblocks.")
    text_layers = _count_blocks(keys, "transformer.resblocks.")
    if vision_layers == 0 or text_layers == 0:
        raise CheckpointError("not a CLIP checkpoint: no transformer blocks found in one of the towers")
    vocab, tok_width = state_dict["token_embedding.weight"].shape
    if tok_width != text_width:
        raise CheckpointError(f"token_embedding width {tok_width} differs from text width {text_width}")
    spec = ClipSpec(
        embed_dim=vision_proj.shape[1],
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_layers=vision_layers,
        vision_heads=_heads(vision_width, hints.pop("vision_heads", None), "vision"),
        text_width=text_width,
        text_layers=text_layers,
        text_heads=_heads(text_width, hints.pop("text_heads", None), "text"),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab,
        vision_mlp_ratio=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
        text_mlp_ratio=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        quick_gelu=bool(hints.pop("quick_gelu", True)),
    )
    for name, value in hints.items():
        if getattr(spec, name, value) != value:
            raise CheckpointError(f"recorded {name}={value!r} disagrees with the weights ({getattr(spec, name)!r})")
    return spec


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """open_clip's BPE tokenizer (bundled vocabulary, no download)."""
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Token ids, shape (len(texts), context_length), identical to ``open_clip.tokenize``."""
    return get_tokenizer(context_length)(texts)
