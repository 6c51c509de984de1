"""The shared scoring head ("emotion conception guidance", docs/method.md section 1).

Both stages score an image against class text embeddings the same way: a global
score from the class token and a local score from the top-k patch similarities,
each L2-normalised over the class axis, then mixed with weight ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

HEAD_MODES = ("both", "global", "local")


@dataclass
class HeadConfig:
    top_k: int = 16  # patches whose similarities are averaged into the local score
    alpha: float = 0.5  # weight of the local score; 1 - alpha weighs the global score
    mode: str = "both"  # "both", or the ablations "global" (class token only) and "local" (patches only)
    logit_scale: float = 1.0  # multiplies the scores before cross-entropy; the reference uses none
    normalize_text: bool = True  # False: the authors' stage-1 test scoring, with raw class text embeddings

    def __post_init__(self) -> None:
        from ..core.errors import ConfigError

        if self.mode not in HEAD_MODES:
            raise ConfigError(f"head.mode={self.mode!r}; expected one of {HEAD_MODES}")
        if self.top_k < 1:
            raise ConfigError(f"head.top_k={self.top_k}; expected a positive number of patches")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"head.alpha={self.alpha}; expected a weight between 0 and 1")
        if self.logit_scale <= 0:
            raise ConfigError(f"head.logit_scale={self.logit_scale}; expected a positive number")


@dataclass
class ScoreOutput:
    """What a CEPrompt model returns for a batch of images."""

    logits: torch.Tensor  # (B, C) head scores, the cross-entropy logits (fp32)
    global_emb: torch.Tensor  # (B, D) projected class token, not normalised
    patches: torch.Tensor  # (B, N, D) projected patch tokens (prompt tokens excluded)
    loss: torch.Tensor | None = None  # training loss, when labels were given
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss terms by name


def patch_class_similarity(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every class: (B, N, D) x (C, D) -> (B, N, C)."""
    return F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).t()


def emotion_scores(
    global_emb: torch.Tensor,
    patches: torch.Tensor,
    text: torch.Tensor,
    cfg: HeadConfig,
) -> torch.Tensor:
    """Class scores (B, C) used directly as cross-entropy logits.

    ``global_emb`` (B, D) is the projected class token, ``patches`` (B, N, D) the projected
    patch tokens (prompt tokens excluded), ``text`` (C, D) the class text embeddings. None
    needs to be normalised by the caller.
    """
    # The head is cheap; fp32 keeps the top-k selection and the normalisations exact under autocast.
    with torch.autocast(device_type=global_emb.device.type, enabled=False):
        return cfg.logit_scale * _mixed_scores(global_emb.float(), patches.float(), text.float(), cfg)


def _mixed_scores(global_emb: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    if cfg.normalize_text:
        text = F.normalize(text, dim=-1)
    parts = []
    if cfg.mode in ("both", "global"):
        s_global = F.normalize(global_emb, dim=-1) @ text.t()
        parts.append((1.0 - cfg.alpha if cfg.mode == "both" else 1.0, F.normalize(s_global, dim=-1)))
    if cfg.mode in ("both", "local"):
        sim = F.normalize(patches, dim=-1) @ text.t()
        k = min(cfg.top_k, sim.shape[1])
        s_local = sim.topk(k, dim=1).values.mean(dim=1)
        parts.append((cfg.alpha if cfg.mode == "both" else 1.0, F.normalize(s_local, dim=-1)))
    return sum(weight * s for weight, s in parts)
