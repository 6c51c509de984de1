"""The shared scoring head ("emotion conception guidance", docs/method.md section 1).

Both stages score an image against class text embeddings the same way: a global
score from the class token and a local score from the top-k patch similarities,
each L2-normalised over the class axis, then mixed with weight ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import check_fields, setting
from ..core.errors import ConfigError
from ..core.ranges import POSITIVE_INT, UNIT, Range

HEAD_MODES = ("both", "global", "local")


@dataclass
class HeadConfig:
    """The ``head`` section of a config: how both stages score an image against the class text."""

    top_k: int = setting(16, accepts=POSITIVE_INT)  # local score: mean of the k best patch similarities
    alpha: float = setting(0.5, accepts=UNIT)  # weight of the local score
    mode: str = setting("both", choices=HEAD_MODES)  # both, global or local
    logit_scale: float = setting(1.0, accepts=Range(0, 1000, lo_open=True))  # scores x this = cross-entropy logits

    def __post_init__(self) -> None:
        check_fields(self, "head.")

    def check_patches(self, num_patches: int) -> None:
        """A top-k the model can honour (the head would clamp it, and the config would say otherwise)."""
        if self.top_k > num_patches:
            raise ConfigError(f"head.top_k={self.top_k}, but this CLIP's vision tower has {num_patches} patches; "
                              f"expected 1..{num_patches}")


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
    normalize_text: bool = True,
) -> torch.Tensor:
    """Class scores (B, C) used directly as cross-entropy logits.

    ``global_emb`` (B, D) is the projected class token, ``patches`` (B, N, D) the projected
    patch tokens (prompt tokens excluded), ``text`` (C, D) the class text embeddings. None
    needs to be normalised by the caller. ``normalize_text=False`` is the authors' stage-1 test scoring, with
    raw class text embeddings.
    """
    # The head is cheap; fp32 keeps the top-k selection and the normalisations exact under autocast.
    with torch.autocast(device_type=global_emb.device.type, enabled=False):
        return cfg.logit_scale * _mixed_scores(global_emb.float(), patches.float(), text.float(), cfg, normalize_text)


def _mixed_scores(global_emb: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, cfg: HeadConfig,
                  normalize_text: bool) -> torch.Tensor:
    if normalize_text:
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
