"""Fixed text prompts: stage 1's class prompts (a template around each class word) and the token check that every
prompt fits the text tower's context. Stage 2's learnable prompts are CAT's own (:mod:`.cat`)."""

from __future__ import annotations

from typing import Sequence

import torch
from open_clip.model import CLIP

from ..core.errors import ConfigError, brief
from .clip import get_tokenizer, tokenize

DEFAULT_TEMPLATE = "a photo of a {} facial expression, a type of facial expression."


def class_prompts(template: str, class_names: Sequence[str]) -> list[str]:
    if template.count("{}") != 1:
        raise ConfigError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
    return [template.format(name.replace("_", " ")) for name in class_names]


def prompt_tokens(texts: Sequence[str], class_names: Sequence[str], context_length: int, setting: str) -> torch.Tensor:
    """Token ids of one prompt per class, refusing a prompt that does not fit the text tower's context: the
    tokenizer would cut its end, the class name with it, and every class would get the same embedding.
    ``setting``: the config key whose text surrounds the class name (named in the error beside the name)."""
    room = context_length - 2  # the start and end tokens
    tokenizer = get_tokenizer(context_length)
    for text, name in zip(texts, class_names):
        n = len(tokenizer.encode(text))
        if n > room:
            around = n - len(tokenizer.encode(name))  # the setting's own words: blamed only when they take much
            blame = f"Shorten the class name (or {setting})" if around > room // 2 else "Shorten the class name"
            raise ConfigError(f"the prompt for class {brief(name)} is {n} tokens, but the text tower takes {room}; "
                              f"its class name would be cut off. {blame}")
    return tokenize(list(texts), context_length)


@torch.no_grad()
def fixed_prompt_features(clip: CLIP, prompts: Sequence[str], class_names: Sequence[str] | None = None,
                          setting: str = "eva.template") -> torch.Tensor:
    """Text embeddings of fixed prompts as the text tower gives them (not yet normalised), (C, D) in fp32."""
    device = clip.token_embedding.weight.device
    tokens = prompt_tokens(prompts, class_names or prompts, clip.positional_embedding.shape[0], setting).to(device)
    return clip.encode_text(tokens).float()
