"""Stage 1, EVA: emotion-conception-guided tuning of the upper vision blocks (docs/method.md section 2).

The vision blocks from ``fix_layer`` up, ``ln_post`` and the projection train; everything else
is frozen. A frozen copy of the original upper blocks is the distillation teacher. The lower
blocks are shared, so they run once per batch for both, without building a graph.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ..core.errors import ConfigError
from .head import HeadConfig, ScoreOutput, emotion_scores
from .prompts import DEFAULT_TEMPLATE, class_prompts, fixed_prompt_features
from .towers import BlockPass, block_forward, run_blocks, vision_embed, vision_project
from .trainable import freeze

KD_TARGETS = ("normalized", "raw")


class EVAModel(nn.Module):
    """Stage-1 student (with its teacher) scoring images against fixed class prompts."""

    def __init__(
        self,
        clip: CLIP,
        class_names: Sequence[str],
        head: HeadConfig | None = None,
        fix_layer: int = 2,
        template: str = DEFAULT_TEMPLATE,
        kd_weight: float = 1.0,
        kd_target: str = "normalized",
        grad_checkpointing: bool = False,
        prompt_names: Sequence[str] | None = None,
        raw_text_at_eval: bool = False,
    ) -> None:
        """``prompt_names``: the words put in the prompts (default: the class names).
        ``raw_text_at_eval``: score with unnormalised class text embeddings in eval mode, as the authors'
        stage-1 ``test()`` does (training always normalises them)."""
        super().__init__()
        n_blocks = len(clip.visual.transformer.resblocks)
        if not 0 <= fix_layer <= n_blocks:
            raise ConfigError(f"eva.fix_layer={fix_layer}; expected 0..{n_blocks} for a {n_blocks}-block vision tower")
        if kd_target not in KD_TARGETS:
            raise ConfigError(f"eva.kd_target={kd_target!r}; expected one of {KD_TARGETS}")
        if kd_weight < 0:
            raise ConfigError(f"eva.kd_weight={kd_weight}; expected >= 0")
        self.clip = clip
        self.class_names = list(class_names)
        self.prompt_names = list(prompt_names) if prompt_names is not None else list(class_names)
        if len(self.prompt_names) != len(self.class_names):
            raise ConfigError(f"data.prompt_names has {len(self.prompt_names)} words for {len(self.class_names)} "
                              "classes")
        self.raw_text_at_eval = raw_text_at_eval
        self.head = head or HeadConfig()
        self.fix_layer = fix_layer
        self.template = template
        self.kd_weight = kd_weight
        self.kd_target = kd_target
        self.grad_checkpointing = grad_checkpointing
        self.block_pass: BlockPass = block_forward  # the compiled form with run.compile

        freeze(clip)
        visual = clip.visual
        for module in (*visual.transformer.resblocks[fix_layer:], visual.ln_post):
            for p in module.parameters():
                p.requires_grad_(True)
        visual.proj.requires_grad_(True)

        # The teacher is only needed to train with distillation (inference passes kd_weight=0).
        self.teacher: nn.ModuleDict | None = None
        if kd_weight > 0:
            self.teacher = nn.ModuleDict({
                "blocks": copy.deepcopy(visual.transformer.resblocks[fix_layer:]),
                "ln_post": copy.deepcopy(visual.ln_post),
            })
            self.teacher.register_parameter("proj", nn.Parameter(visual.proj.detach().clone()))
            freeze(self.teacher)
        # Computed once per run (the text tower is frozen); not part of any checkpoint. The raw ones serve
        # only the authors' stage-1 test scoring.
        raw = fixed_prompt_features(clip, self.prompts, self.class_names)
        self.register_buffer("text_features", F.normalize(raw, dim=-1), persistent=False)
        self.register_buffer("text_raw", raw, persistent=False)

    def use_classes(self, class_names: Sequence[str], words: Sequence[str]) -> None:
        """Score ``class_names`` from now on, each prompt the template around its ``words``."""
        raw = fixed_prompt_features(self.clip, class_prompts(self.template, words), class_names)
        self.text_raw = raw.to(self.text_raw.device)
        self.text_features = F.normalize(self.text_raw, dim=-1)
        self.class_names, self.prompt_names = list(class_names), list(words)

    @property
    def prompts(self) -> list[str]:
        return class_prompts(self.template, self.prompt_names)

    def _head(self) -> HeadConfig:
        if self.raw_text_at_eval and not self.training:
            return dataclasses.replace(self.head, normalize_text=False)
        return self.head

    def train(self, mode: bool = True) -> "EVAModel":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def class_text_features(self) -> torch.Tensor:
        """L2-normalised class embeddings; unnormalised in eval mode with ``raw_text_at_eval``."""
        return self.text_raw if self.raw_text_at_eval and not self.training else self.text_features

    def _lower(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        with torch.no_grad():
            x = visual.ln_pre(vision_embed(visual, images))
            return run_blocks(visual.transformer.resblocks[: self.fix_layer], x, block_pass=self.block_pass)

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = run_blocks(visual.transformer.resblocks[self.fix_layer:], x, first_index=self.fix_layer,
                       grad_checkpointing=self.grad_checkpointing, block_pass=self.block_pass)
        return vision_project(visual, x)

    def enable_teacher_cache(self, n_keys: int) -> None:
        """Remember the teacher's embedding of every repeatable view (see ``FERDataset``).

        The teacher is frozen, so an identical input gives an identical embedding: with flip-only
        augmentation each training image has two views, and after they have been seen once the
        teacher's forward pass is skipped (a quarter of a stage-1 step).
        """
        if self.teacher is None:
            return
        ref = self.teacher.proj
        self.register_buffer("teacher_cache", torch.zeros(n_keys, ref.shape[1], device=ref.device), persistent=False)
        self.register_buffer("teacher_known", torch.zeros(n_keys, dtype=torch.bool, device=ref.device),
                             persistent=False)

    def _teacher_targets(self, lower: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        if views is None or not hasattr(self, "teacher_cache"):
            return self._teacher_global(lower).float()
        keys = views.to(self.teacher_known.device)
        known = (keys >= 0) & self.teacher_known[keys.clamp(min=0)]
        out = torch.empty(len(keys), self.teacher_cache.shape[1], device=lower.device)
        if known.any():
            out[known] = self.teacher_cache[keys[known]].to(lower.device)
        todo = ~known
        if todo.any():
            fresh = self._teacher_global(lower[todo]).float()
            out[todo] = fresh
            new = keys[todo] >= 0
            self.teacher_cache[keys[todo][new]] = fresh[new].to(self.teacher_cache.device)
            self.teacher_known[keys[todo][new]] = True
        return out

    def teacher_cache_state(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "teacher_cache"):
            return {}
        return {"cache": self.teacher_cache.cpu(), "known": self.teacher_known.cpu()}

    def load_teacher_cache_state(self, state: dict[str, torch.Tensor]) -> None:
        if state and hasattr(self, "teacher_cache") and state["cache"].shape == self.teacher_cache.shape:
            self.teacher_cache.copy_(state["cache"])
            self.teacher_known.copy_(state["known"])

    @torch.no_grad()
    def _teacher_global(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.teacher["blocks"], x, block_pass=self.block_pass)
        return self.teacher["ln_post"](x[:, 0]) @ self.teacher.proj

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, text_features: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
    ) -> ScoreOutput:
        """Head scores; with ``labels`` also the loss: CE plus ``kd_weight`` x L1 distance of the
        global embedding to the teacher's (computed in ``forward`` so DistributedDataParallel sees it).
        ``views`` are the batch's view keys, for the teacher cache."""
        lower = self._lower(images)
        tokens = self._student(lower)
        text = self.class_text_features() if text_features is None else text_features
        logits = emotion_scores(tokens[:, 0], tokens[:, 1:], text, self._head())
        out = ScoreOutput(logits=logits, global_emb=tokens[:, 0], patches=tokens[:, 1:])
        if labels is None:
            return out
        out.loss = F.cross_entropy(logits, labels)
        out.parts["ce"] = out.loss.detach()
        if self.teacher is not None:
            student = F.normalize(out.global_emb.float(), dim=-1)
            teacher = self._teacher_targets(lower, views)
            if self.kd_target == "normalized":
                teacher = F.normalize(teacher, dim=-1)
            kd = F.l1_loss(student, teacher)
            out.parts["kd"] = kd.detach()
            out.loss = out.loss + self.kd_weight * kd
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights stage 1 changes, named as in the CLIP so they overlay the base checkpoint."""
        return {n: p.detach() for n, p in self.clip.named_parameters() if p.requires_grad}

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """AdamW groups: block i at ``lr * layer_decay ** (n_blocks - i)``, ``ln_post``/projection at ``lr``;
        weight decay only on tensors with 2 or more dimensions."""
        visual = self.clip.visual
        n_blocks = len(visual.transformer.resblocks)
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}

        def add(p: nn.Parameter, scale: float) -> None:
            if p.requires_grad:
                groups.setdefault((scale, weight_decay if p.ndim >= 2 else 0.0), []).append(p)

        for i, block in enumerate(visual.transformer.resblocks):
            for p in block.parameters():
                add(p, layer_decay ** (n_blocks - i))
        for p in (*visual.ln_post.parameters(), visual.proj):
            add(p, 1.0)
        return [
            {"params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": wd}
            for (scale, wd), params in sorted(groups.items(), key=lambda kv: kv[0])
        ]
