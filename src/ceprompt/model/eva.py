"""Stage 1, EVA: emotion-conception-guided tuning of the upper vision blocks (docs/method.md section 2).

The vision blocks from ``fix_layer`` up, ``ln_post`` and the projection train; everything else
is frozen. A frozen copy of the original upper blocks is the distillation teacher. The lower
blocks are shared, so they run once per batch for both, without building a graph.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ..core.config import check_fields, setting
from ..core.errors import ConfigError
from ..core.ranges import COUNT, Range
from .head import HeadConfig, ScoreOutput, emotion_scores
from .prompts import DEFAULT_TEMPLATE, class_prompts, fixed_prompt_features
from .stage import BuildOptions, ClassWords, Stage, TrainBatch
from .teacher_cache import TeacherCache
from .towers import run_blocks, vision_embed, vision_project
from .trainable import freeze

KD_TARGETS = ("normalized", "raw")


@dataclass
class EvaConfig:
    """The ``eva`` section of a config: stage 1's settings."""

    fix_layer: int = setting(2, accepts=COUNT)  # vision blocks below this index stay frozen
    template: str = DEFAULT_TEMPLATE  # fixed class prompt, {} is the class name
    kd_weight: float = setting(1.0, accepts=Range(0, 1000))  # lambda of the L1 distillation term
    kd_target: str | None = setting(None, choices=KD_TARGETS)  # normalized, or raw (the authors' unnormalised
    #   teacher); None: by compat
    raw_text_at_eval: bool = False  # the authors' stage-1 test(): unnormalised class text embeddings (a defect)

    # Settings that change how a trained model scores, not what it learned: `eval --set` may override them.
    EVAL_TIME: ClassVar[tuple[str, ...]] = ("raw_text_at_eval",)

    def __post_init__(self) -> None:
        check_fields(self, "eva.")

    def fill_compat(self, authors: bool) -> None:
        """Settings left null take the authors' choice (``compat: authors``) or ceprompt's."""
        if self.kd_target is None:
            self.kd_target = "raw" if authors else "normalized"

    def check_for(self, clip: CLIP) -> None:
        n_blocks = len(clip.visual.transformer.resblocks)
        if not 0 <= self.fix_layer <= n_blocks:
            raise ConfigError(f"eva.fix_layer={self.fix_layer}; expected 0..{n_blocks} for a {n_blocks}-block vision "
                              "tower")
        class_prompts(self.template, ["x"])  # exactly one {} for the class name


class EVA(Stage):
    """Stage-1 student (with its teacher while training) scoring images against fixed class prompts."""

    name, number, title, settings_type = "eva", 1, "stage 1 (EVA: tuned upper vision blocks)", EvaConfig

    def __init__(self, clip: CLIP, settings: EvaConfig, head: HeadConfig, classes: ClassWords,
                 options: BuildOptions = BuildOptions()) -> None:
        super().__init__(clip, settings, head, classes, options)
        settings.check_for(clip)
        self.fix_layer = settings.fix_layer
        self.kd_target = settings.kd_target or "normalized"
        freeze(clip)
        visual = clip.visual
        for module in (*visual.transformer.resblocks[self.fix_layer:], visual.ln_post):
            for p in module.parameters():
                p.requires_grad_(True)
        visual.proj.requires_grad_(True)

        # The teacher is only needed to train with distillation.
        self.teacher: nn.ModuleDict | None = None
        if options.training and settings.kd_weight > 0:
            self.teacher = nn.ModuleDict({
                "blocks": copy.deepcopy(visual.transformer.resblocks[self.fix_layer:]),
                "ln_post": copy.deepcopy(visual.ln_post),
            })
            self.teacher.register_parameter("proj", nn.Parameter(visual.proj.detach().clone()))
            freeze(self.teacher)
        self.cache = TeacherCache(visual.proj.shape[1]) if self.teacher is not None and options.teacher_cache \
            else None
        # The text tower is frozen: the trained classes' embeddings are computed once, not per step.
        raw = self._raw_text(classes.words)
        self.register_buffer("text_normalized", F.normalize(raw, dim=-1), persistent=False)
        self.register_buffer("text_raw", raw, persistent=False)

    @classmethod
    def zero_shot(cls, clip: CLIP, settings: EvaConfig, head: HeadConfig, classes: ClassWords) -> "EVA":
        """The untuned CLIP scored with the stage-1 prompts and the head: the baseline (every block frozen)."""
        n_blocks = len(clip.visual.transformer.resblocks)
        return cls.build(clip, dataclasses.replace(settings, fix_layer=n_blocks), head, classes)

    # -- scoring ------------------------------------------------------------------------------------------------

    def _raw_text(self, words: Sequence[str]) -> torch.Tensor:
        return fixed_prompt_features(self.clip, class_prompts(self.settings.template, words), words)

    def _unnormalized_text(self) -> bool:
        """The authors' stage-1 ``test()`` scores with raw class text embeddings (training normalises them)."""
        return self.settings.raw_text_at_eval and not self.training

    def text_features(self, words: Sequence[str]) -> torch.Tensor:
        """The template around each of ``words`` through the frozen text tower: L2-normalised, or raw in eval mode
        with ``raw_text_at_eval``."""
        if tuple(words) == self.classes.words:
            return self.text_raw if self._unnormalized_text() else self.text_normalized
        raw = self._raw_text(words).to(self.text_raw.device)
        return raw if self._unnormalized_text() else F.normalize(raw, dim=-1)

    def prompts(self) -> list[str]:
        return class_prompts(self.settings.template, self.classes.words)

    def train(self, mode: bool = True) -> "EVA":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

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

    def _scores(self, lower: torch.Tensor, text: torch.Tensor) -> ScoreOutput:
        tokens = self._student(lower)
        logits = emotion_scores(tokens[:, 0], tokens[:, 1:], text, self.head, not self._unnormalized_text())
        return ScoreOutput(logits=logits, global_emb=tokens[:, 0], patches=tokens[:, 1:])

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> ScoreOutput:
        return self._scores(self._lower(images), text_features)

    @torch.no_grad()
    def _teacher_global(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.teacher["blocks"], x, block_pass=self.block_pass)
        return self.teacher["ln_post"](x[:, 0]) @ self.teacher.proj

    # -- training -----------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch) -> ScoreOutput:
        """CE plus ``kd_weight`` x the L1 distance of the global embedding to the frozen teacher's."""
        lower = self._lower(batch.images)
        out = self._scores(lower, self.class_text_features())
        out.loss = F.cross_entropy(out.logits, batch.labels)
        out.parts["ce"] = out.loss.detach()
        if self.teacher is not None:
            student = F.normalize(out.global_emb.float(), dim=-1)
            if self.cache is not None:
                teacher = self.cache.targets(lower, batch.index, batch.flip, self._teacher_global)
            else:
                teacher = self._teacher_global(lower).float()
            if self.kd_target == "normalized":
                teacher = F.normalize(teacher, dim=-1)
            kd = F.l1_loss(student, teacher)
            out.parts["kd"] = kd.detach()
            out.loss = out.loss + self.settings.kd_weight * kd
        return out

    def start_training(self, n_samples: int) -> None:
        if self.cache is not None:
            self.cache.reserve(n_samples)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.cache.state() if self.cache is not None else {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.cache is not None:
            self.cache.load(state)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights stage 1 changes, named as in the CLIP so they overlay the base checkpoint."""
        return {n: p.detach() for n, p in self.clip.named_parameters() if p.requires_grad}

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
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

    @classmethod
    def describe(cls, settings: EvaConfig) -> str:
        return (f"EVA: blocks from {settings.fix_layer} trained, distillation weight {settings.kd_weight} "
                f"({settings.kd_target} teacher)")
