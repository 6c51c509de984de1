"""Text prompts: the fixed class prompts of stage 1 and the learnable coupled prompts of stage 2.

Stage 2's prompt learner (docs/method.md section 3) holds *all* learnable state of CAT:

* ``ctx`` - n_ctx context vectors replacing the first n_ctx tokens of the init phrase,
* ``invariant`` - an optional class-invariant token placed before them,
* ``deep_text[j-1]`` - the text prompt P_j that replaces the context slots before text block j,
* ``vision_maps[j-1]`` - F_j: text width -> vision width, giving the vision prompt F_j(P_j),
* ``shallow_map`` - F_0 for the shallow vision prompts (``append`` mode only).

Widths come from the CLIP it is built on.
"""

from __future__ import annotations

from typing import Sequence

import torch
from open_clip.model import CLIP
from torch import nn

from ..core.errors import ConfigError
from .clip import get_tokenizer, tokenize

DEFAULT_TEMPLATE = "a photo of a {} facial expression, a type of facial expression."
VISION_PROMPT_MODES = ("append", "overwrite")
PROMPT_LAYOUTS = ("ceprompt", "authors")
PLACEHOLDER = "X"


def class_prompts(template: str, class_names: Sequence[str]) -> list[str]:
    if template.count("{}") != 1:
        raise ConfigError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
    return [template.format(name.replace("_", " ")) for name in class_names]


def prompt_tokens(texts: Sequence[str], class_names: Sequence[str], context_length: int, setting: str) -> torch.Tensor:
    """Token ids of one prompt per class, refusing a prompt that does not fit the text tower's context: the
    tokenizer would cut its end, the class name with it, and every class would get the same embedding."""
    room = context_length - 2  # the start and end tokens
    for text, name in zip(texts, class_names):
        n = len(get_tokenizer(context_length).encode(text))
        if n > room:
            raise ConfigError(f"{setting}: the prompt for class {name!r} is {n} tokens, but the text tower takes "
                              f"{room}; its class name would be cut off. Shorten it")
    return tokenize(list(texts), context_length)


@torch.no_grad()
def fixed_prompt_features(clip: CLIP, prompts: Sequence[str], class_names: Sequence[str] | None = None,
                          setting: str = "eva.template") -> torch.Tensor:
    """Text embeddings of fixed prompts as the text tower gives them (not yet normalised), (C, D) in fp32."""
    device = clip.token_embedding.weight.device
    tokens = prompt_tokens(prompts, class_names or prompts, clip.positional_embedding.shape[0], setting).to(device)
    return clip.encode_text(tokens).float()


class PromptLearner(nn.Module):
    """Coupled text/vision prompts of CAT; the only trainable module of stage 2."""

    def __init__(
        self,
        clip: CLIP,
        class_names: Sequence[str],
        n_ctx: int = 2,
        ctx_init: str = "a photo of",
        depth: int = 9,
        invariant_token: bool = False,
        vision_prompts: str = "append",
        prompt_names: Sequence[str] | None = None,
        layout: str = "ceprompt",
    ) -> None:
        """``prompt_names``: the words put in the prompts (default: the class names). ``layout`` matters only
        with the invariant token: ``ceprompt`` builds ``[SOS] inv v1..vn <init rest> name .`` with the deep
        prompts in the context slots; ``authors`` builds ``[SOS] X X X name .`` (invariant and context as
        placeholders) with the deep prompts in slots 1..n_ctx, as the authors' code does."""
        super().__init__()
        text_width = clip.token_embedding.weight.shape[1]
        vision_width = clip.visual.conv1.weight.shape[0]
        max_depth = min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        if n_ctx < 0:
            raise ConfigError(f"cat.n_ctx={n_ctx}; expected >= 0")
        if not 0 <= depth <= max_depth:
            raise ConfigError(f"cat.prompt_depth={depth}; expected 0..{max_depth} (blocks in the shorter tower)")
        if depth > 1 and n_ctx == 0:
            raise ConfigError(f"cat.prompt_depth={depth} needs cat.n_ctx >= 1 (deep prompts fill the context slots)")
        if vision_prompts not in VISION_PROMPT_MODES:
            raise ConfigError(f"cat.vision_prompts={vision_prompts!r}; expected one of {VISION_PROMPT_MODES}")
        if layout not in PROMPT_LAYOUTS:
            raise ConfigError(f"cat.prompt_layout={layout!r}; expected one of {PROMPT_LAYOUTS}")
        words = list(prompt_names) if prompt_names is not None else list(class_names)
        if len(words) != len(class_names):
            raise ConfigError(f"data.prompt_names has {len(words)} words for {len(class_names)} classes")
        n_patches = clip.visual.positional_embedding.shape[0] - 1
        if vision_prompts == "overwrite" and n_ctx > n_patches:
            raise ConfigError(f"cat.n_ctx={n_ctx} exceeds the {n_patches} patch tokens it would overwrite")
        self.class_names = list(class_names)
        self.n_ctx, self.depth, self.vision_prompts = n_ctx, depth, vision_prompts
        self.ctx_init = ctx_init

        init_ids = get_tokenizer().encode(ctx_init) if ctx_init.strip() else []
        if ctx_init.strip() and n_ctx > len(init_ids):
            raise ConfigError(
                f"cat.n_ctx={n_ctx} but cat.ctx_init={ctx_init!r} has only {len(init_ids)} tokens; "
                "lower n_ctx or set ctx_init to '' for randomly initialised context"
            )
        prefix = ctx_init.strip() if ctx_init.strip() else " ".join([PLACEHOLDER] * n_ctx)
        authors_layout = invariant_token and layout == "authors"
        if authors_layout:
            prefix = " ".join([PLACEHOLDER] * (1 + n_ctx))
        elif invariant_token:
            prefix = f"{PLACEHOLDER} {prefix}"
        self.prefix = prefix
        self.register_buffer("token_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("token_embeds", torch.zeros(0), persistent=False)
        self.set_words(clip, class_names, words)
        embeds = self.token_embeds
        self.ctx_start = 1 + int(invariant_token)  # position 0 is the start-of-text token

        # where the deep text prompts go: the context slots, or (authors' layout) slots 1..n_ctx
        self.deep_start = 1 if authors_layout else self.ctx_start
        if n_ctx:
            if init_ids:
                init_embeds = clip.token_embedding(torch.tensor(init_ids[:n_ctx], device=embeds.device)).float()
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
        self.shallow_map = nn.Linear(text_width, vision_width) if vision_prompts == "append" and n_ctx else None

    @torch.no_grad()
    def set_words(self, clip: CLIP, class_names: Sequence[str], words: Sequence[str]) -> None:
        """Build the prompts of ``class_names`` from ``words`` around the learned context (which stays as it is):
        a trained model scores classes it never saw by their words."""
        texts = [f"{self.prefix} {name.replace('_', ' ')}.".strip() for name in words]
        token_ids = prompt_tokens(texts, class_names, clip.positional_embedding.shape[0], "cat.ctx_init")
        device = clip.token_embedding.weight.device
        self.token_ids = token_ids.to(device)
        self.token_embeds = clip.token_embedding(self.token_ids).float()
        self.class_names, self.prompt_names = list(class_names), list(words)

    @property
    def ctx_slots(self) -> slice:
        """Sequence positions the deep text prompts replace before blocks 1..depth-1."""
        return slice(self.deep_start, self.deep_start + self.n_ctx)

    def text_embeddings(self) -> torch.Tensor:
        """Word embeddings of every class prompt with the learnable tokens in place: (C, L, text width)."""
        x = self.token_embeds
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
