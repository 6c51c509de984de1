"""Stage 2, CAT: the conception-appearance tuner (docs/method.md section 3): its settings, its prompt learner and
the stage.

The CLIP (with stage-1 weights already loaded) is frozen; only the prompt learner trains.
Text and vision prompts are coupled: each vision prompt is a linear map of a text prompt. The prompt learner holds
*all* learnable state of CAT:

* ``ctx`` - n_ctx context vectors replacing the first n_ctx tokens of the init phrase,
* ``invariant`` - an optional class-invariant token placed before them,
* ``deep_text[j-1]`` - the text prompt P_j that replaces the context slots before text block j,
* ``vision_maps[j-1]`` - F_j: text width -> vision width, giving the vision prompt F_j(P_j),
* ``shallow_map`` - F_0 for the shallow vision prompts (``append`` mode only).

Widths come from the CLIP it is built on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ..core.config import check_fields, setting
from ..core.errors import ConfigError
from ..core.ranges import COUNT, Range
from .clip import get_tokenizer
from .head import HeadConfig, ScoreOutput, emotion_scores
from .prompts import prompt_tokens
from .stage import BuildOptions, ClassWords, Stage, TrainBatch
from .towers import run_blocks, text_encode_embeddings, vision_embed, vision_project
from .trainable import freeze

VISION_PROMPT_MODES = ("append", "overwrite")
PROMPT_LAYOUTS = ("ceprompt", "authors")
PLACEHOLDER = "X"


@dataclass
class CatConfig:
    """The ``cat`` section of a config: stage 2's settings."""

    n_ctx: int = setting(2, accepts=Range(0, 64, integer=True))  # learnable context vectors
    ctx_init: str = "a photo of"  # phrase whose first n_ctx tokens initialise them ('' = random)
    prompt_depth: int = setting(9, accepts=COUNT)  # J: deep prompts before blocks 1..J-1 of both towers
    invariant_token: bool = False  # an extra learnable class-invariant token before the context
    vision_prompts: str | None = setting(None, choices=VISION_PROMPT_MODES)  # append (own slots, MaPLe) or
    #   overwrite (the authors'); None: by compat
    prompt_layout: str | None = setting(None, choices=PROMPT_LAYOUTS)  # with the invariant token: ceprompt
    #   ([SOS] inv ctx <init rest> name .) or authors ([SOS] X X X name ., deep prompts in slots 1..n_ctx); None:
    #   by compat

    def __post_init__(self) -> None:
        check_fields(self, "cat.")

    def fill_compat(self, authors: bool) -> None:
        """Settings left null take the authors' choice (``compat: authors``) or ceprompt's."""
        if self.vision_prompts is None:
            self.vision_prompts = "overwrite" if authors else "append"
        if self.prompt_layout is None:
            self.prompt_layout = "authors" if authors else "ceprompt"

    def check_for(self, clip: CLIP) -> None:
        max_depth = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        if not 0 <= self.prompt_depth <= max_depth:
            raise ConfigError(f"cat.prompt_depth={self.prompt_depth}; expected 0..{max_depth} (blocks in the shorter "
                              "tower)")
        if self.prompt_depth > 1 and self.n_ctx == 0:
            raise ConfigError(f"cat.prompt_depth={self.prompt_depth} needs cat.n_ctx >= 1 (deep prompts fill the "
                              "context slots)")
        n_patches = clip.visual.positional_embedding.shape[0] - 1
        if self.vision_prompts == "overwrite" and self.n_ctx > n_patches:
            raise ConfigError(f"cat.n_ctx={self.n_ctx} exceeds the {n_patches} patch tokens it would overwrite")
        init_ids = get_tokenizer().encode(self.ctx_init) if self.ctx_init.strip() else []
        if self.ctx_init.strip() and self.n_ctx > len(init_ids):
            raise ConfigError(f"cat.n_ctx={self.n_ctx} but cat.ctx_init={self.ctx_init!r} has only {len(init_ids)} "
                              "tokens; lower n_ctx or set ctx_init to '' for randomly initialised context")


class PromptLearner(nn.Module):
    """Coupled text/vision prompts of CAT; the only trainable module of stage 2."""

    def __init__(self, clip: CLIP, settings: CatConfig, words: Sequence[str]) -> None:
        """``words``: the trained classes' prompt words. ``settings.prompt_layout`` matters only with the invariant
        token: ``ceprompt`` builds ``[SOS] inv v1..vn <init rest> name .`` with the deep prompts in the context
        slots; ``authors`` builds ``[SOS] X X X name .`` (invariant and context as placeholders) with the deep
        prompts in slots 1..n_ctx, as the authors' code does."""
        super().__init__()
        text_width = clip.token_embedding.weight.shape[1]
        vision_width = clip.visual.conv1.weight.shape[0]
        n_ctx, depth, invariant_token = settings.n_ctx, settings.prompt_depth, settings.invariant_token
        self.n_ctx, self.depth, self.vision_prompts = n_ctx, depth, settings.vision_prompts or "append"
        self.ctx_init = settings.ctx_init
        init_ids = get_tokenizer().encode(self.ctx_init) if self.ctx_init.strip() else []
        prefix = self.ctx_init.strip() if self.ctx_init.strip() else " ".join([PLACEHOLDER] * n_ctx)
        authors_layout = invariant_token and settings.prompt_layout == "authors"
        if authors_layout:
            prefix = " ".join([PLACEHOLDER] * (1 + n_ctx))
        elif invariant_token:
            prefix = f"{PLACEHOLDER} {prefix}"
        self.prefix = prefix
        token_ids, token_embeds = self.tokens(clip, words)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_embeds", token_embeds, persistent=False)
        self.ctx_start = 1 + int(invariant_token)  # position 0 is the start-of-text token

        # where the deep text prompts go: the context slots, or (authors' layout) slots 1..n_ctx
        self.deep_start = 1 if authors_layout else self.ctx_start
        if n_ctx:
            if init_ids:
                init_embeds = clip.token_embedding(torch.tensor(init_ids[:n_ctx], device=token_embeds.device)).float()
                ctx = init_embeds.detach().clone()
            else:
                ctx = torch.randn(n_ctx, text_width) * 0.02
            self.ctx = nn.Parameter(ctx)
        else:
            self.register_parameter("ctx", None)
        self.invariant = nn.Parameter(torch.randn(1, text_width) * 0.02) if invariant_token else None
        n_deep = max(depth - 1, 0)
        self.deep_text = nn.ParameterList([nn.Parameter(torch.randn(n_ctx, text_width) * 0.02) for _ in range(n_deep)])
        self.vision_maps = nn.ModuleList([nn.Linear(text_width, vision_width) for _ in range(n_deep)])
        self.shallow_map = nn.Linear(text_width, vision_width) if self.vision_prompts == "append" and n_ctx else None

    @torch.no_grad()
    def tokens(self, clip: CLIP, words: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and frozen word embeddings of the prompts around ``words`` (the learned context goes in
        their slots later): a trained model scores classes it never saw by their words."""
        texts = [f"{self.prefix} {word.replace('_', ' ')}.".strip() for word in words]
        token_ids = prompt_tokens(texts, words, clip.positional_embedding.shape[0], "cat.ctx_init")
        token_ids = token_ids.to(clip.token_embedding.weight.device)
        return token_ids, clip.token_embedding(token_ids).float()

    @property
    def ctx_slots(self) -> slice:
        """Sequence positions the deep text prompts replace before blocks 1..depth-1."""
        return slice(self.deep_start, self.deep_start + self.n_ctx)

    def text_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Word embeddings of every class prompt (``token_embeds``, from :meth:`tokens`) with the learnable tokens
        in place: (C, L, text width)."""
        x = token_embeds
        n_classes = x.shape[0]
        learned = []
        if self.invariant is not None:
            learned.append(self.invariant)
        if self.ctx is not None:
            learned.append(self.ctx)
        if not learned:
            return x
        middle = torch.cat(learned, dim=0).unsqueeze(0).expand(n_classes, -1, -1)
        return torch.cat([x[:, :1], middle, x[:, 1 + middle.shape[1]:]], dim=1)

    def text_hook(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Before text block j (1 <= j < depth) the context slots hold P_j."""
        if not 1 <= block < self.depth:
            return x
        prompt = self.deep_text[block - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        s = self.ctx_slots
        return torch.cat([x[:, : s.start], prompt, x[:, s.stop:]], dim=1)

    def shallow_vision_prompts(self) -> torch.Tensor | None:
        """F_0(ctx), (n_ctx, vision width), appended after the positional embedding; None in overwrite mode."""
        if self.shallow_map is None:
            return None
        return self.shallow_map(self.ctx)

    def deep_vision_prompts(self) -> list[torch.Tensor]:
        """F_j(P_j) for j = 1 .. depth-1, each (n_ctx, vision width)."""
        return [vmap(p) for vmap, p in zip(self.vision_maps, self.deep_text)]


class CAT(Stage):
    """Frozen (stage-1) CLIP scored with coupled, learnable text and vision prompts."""

    name, number, title, settings_type = "cat", 2, "stage 2 (CAT: coupled text and vision prompts)", CatConfig
    builds_on = "eva"

    def __init__(self, clip: CLIP, settings: CatConfig, head: HeadConfig, classes: ClassWords,
                 options: BuildOptions = BuildOptions()) -> None:
        super().__init__(clip, settings, head, classes, options)
        settings.check_for(clip)
        freeze(clip)
        self.prompt_learner = PromptLearner(clip, settings, classes.words)

    def text_features(self, words: Sequence[str]) -> torch.Tensor:
        """Class embeddings of the prompts around ``words`` with the learned context, L2-normalised: (C, D).
        Recomputed after each training step; the trained classes' token ids are kept, others tokenised here.

        Always in fp32, also under autocast: every score depends on these few vectors, and a few prompts
        of a few tokens cost little next to a batch of images."""
        pl = self.prompt_learner
        token_ids, embeds = (pl.token_ids, pl.token_embeds) if tuple(words) == self.classes.words \
            else pl.tokens(self.clip, words)
        with torch.autocast(device_type=embeds.device.type, enabled=False):
            feats = text_encode_embeddings(self.clip, pl.text_embeddings(embeds), token_ids, hook=pl.text_hook,
                                           block_pass=self.block_pass)
        return F.normalize(feats.float(), dim=-1)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Projected tokens (B, 1 + N, D) of the prompted vision tower; prompt tokens are dropped."""
        pl = self.prompt_learner
        visual = self.clip.visual
        x = vision_embed(visual, images)
        n_tokens = x.shape[1]
        batch = x.shape[0]
        shallow = pl.shallow_vision_prompts()
        if shallow is not None:
            x = torch.cat([x, shallow.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
        x = visual.ln_pre(x)
        deep = pl.deep_vision_prompts()

        def hook(block: int, x: torch.Tensor) -> torch.Tensor:
            if not 1 <= block <= len(deep):
                return x
            prompt = deep[block - 1].to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
            if pl.vision_prompts == "append":
                return torch.cat([x[:, :n_tokens], prompt], dim=1)
            return torch.cat([x[:, :1], prompt, x[:, 1 + pl.n_ctx:]], dim=1)

        x = run_blocks(visual.transformer.resblocks, x, hook=hook, grad_checkpointing=self.grad_checkpointing,
                       block_pass=self.block_pass)
        return vision_project(visual, x[:, :n_tokens])

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> ScoreOutput:
        tokens = self.encode_image_tokens(images)
        logits = emotion_scores(tokens[:, 0], tokens[:, 1:], text_features, self.head)
        return ScoreOutput(logits=logits, global_emb=tokens[:, 0], patches=tokens[:, 1:])

    def training_loss(self, batch: TrainBatch) -> ScoreOutput:
        """CE of the scores against the prompts encoded in this call (they change with every step)."""
        out = self.score(batch.images, self.class_text_features())
        out.loss = F.cross_entropy(out.logits, batch.labels)
        out.parts["ce"] = out.loss.detach()
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"prompt_learner.{n}": p.detach() for n, p in self.prompt_learner.named_parameters()}

    own_state_dict = trainable_state_dict  # the CLIP is the stage-1 one; only the prompt learner is CAT's

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
        """One group, the prompt learner, at ``lr`` with weight decay on every tensor (no layer decay: nothing of
        the towers trains)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0,
                 "weight_decay": weight_decay}]

    @classmethod
    def describe(cls, settings: CatConfig) -> str:
        return (f"CAT: {settings.n_ctx} context vectors from {settings.ctx_init!r}, prompt depth "
                f"{settings.prompt_depth}, vision prompts {settings.vision_prompts}, invariant token "
                f"{settings.invariant_token}")
