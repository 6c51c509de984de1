"""Stage 2, CAT: the conception-appearance tuner (docs/method.md section 3).

The CLIP (with stage-1 weights already loaded) is frozen; only the prompt learner trains.
Text and vision prompts are coupled: each vision prompt is a linear map of a text prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from .head import HeadConfig, ScoreOutput, emotion_scores
from .prompts import PromptLearner
from .towers import BlockPass, block_forward, run_blocks, text_encode_embeddings, vision_embed, vision_project
from .trainable import freeze


class CATModel(nn.Module):
    """Frozen (stage-1) CLIP scored with coupled, learnable text and vision prompts."""

    def __init__(
        self,
        clip: CLIP,
        class_names: Sequence[str],
        head: HeadConfig | None = None,
        n_ctx: int = 2,
        ctx_init: str = "a photo of",
        prompt_depth: int = 9,
        invariant_token: bool = False,
        vision_prompts: str = "append",
        grad_checkpointing: bool = False,
        prompt_names: Sequence[str] | None = None,
        prompt_layout: str = "ceprompt",
    ) -> None:
        super().__init__()
        freeze(clip)
        self.clip = clip
        self.class_names = list(class_names)
        self.head = head or HeadConfig()
        self.grad_checkpointing = grad_checkpointing
        self.block_pass: BlockPass = block_forward  # the compiled form with run.compile
        self.prompt_learner = PromptLearner(
            clip, class_names, n_ctx=n_ctx, ctx_init=ctx_init, depth=prompt_depth,
            invariant_token=invariant_token, vision_prompts=vision_prompts, prompt_names=prompt_names,
            layout=prompt_layout,
        )

    def use_classes(self, class_names: Sequence[str], words: Sequence[str]) -> None:
        """Score ``class_names`` from now on, each prompt built from its ``words`` with the learned context."""
        self.prompt_learner.set_words(self.clip, class_names, words)
        self.class_names = list(class_names)

    def class_text_features(self) -> torch.Tensor:
        """Class embeddings from the current prompts, L2-normalised: (C, D). Recompute after each step.

        Always in fp32, also under autocast: every score depends on these few vectors, and a few prompts
        of a few tokens cost little next to a batch of images."""
        pl = self.prompt_learner
        with torch.autocast(device_type=pl.token_embeds.device.type, enabled=False):
            feats = text_encode_embeddings(self.clip, pl.text_embeddings(), pl.token_ids, hook=pl.text_hook,
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

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, text_features: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
    ) -> ScoreOutput:
        """Head scores; pass ``text_features`` (from :meth:`class_text_features`) to reuse them across
        batches at evaluation. Without them the prompts are encoded in this call (training).
        ``views`` is accepted for the trainer's uniform call and not needed here."""
        text = self.class_text_features() if text_features is None else text_features
        tokens = self.encode_image_tokens(images)
        logits = emotion_scores(tokens[:, 0], tokens[:, 1:], text, self.head)
        out = ScoreOutput(logits=logits, global_emb=tokens[:, 0], patches=tokens[:, 1:])
        if labels is not None:
            out.loss = F.cross_entropy(logits, labels)
            out.parts["ce"] = out.loss.detach()
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"prompt_learner.{n}": p.detach() for n, p in self.prompt_learner.named_parameters()}
