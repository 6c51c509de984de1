"""Forward passes through open_clip's CLIP towers, split where CEPrompt needs to reach in.

open_clip's ``encode_image``/``encode_text`` run a tower end to end. CEPrompt needs the
pieces: the token sequence before the blocks (to append prompts), each block on its own
(to replace prompt slots before it, or to stop at ``fix_layer``), and ``ln_post`` plus the
projection applied to *every* token (the local embeddings). The blocks themselves are
open_clip's, called as they are; attention goes through ``scaled_dot_product_attention``
inside ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

# Called with (block index, tokens) before that block runs; returns the tokens to feed it.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def vision_embed(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + positional embedding, before ``ln_pre``: (B, 1 + N, width)."""
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    return x + visual.positional_embedding.to(x.dtype)


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    first_index: int = 0,
    attn_mask: torch.Tensor | None = None,
    hook: BlockHook | None = None,
    grad_checkpointing: bool = False,
) -> torch.Tensor:
    """Run ``blocks`` in order; ``first_index`` is the absolute index of ``blocks[0]`` for the hook."""
    for offset, block in enumerate(blocks):
        if hook is not None:
            x = hook(first_index + offset, x)
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    return x


def vision_project(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``ln_post`` and the output projection on every token: (B, T, width) -> (B, T, embed)."""
    return visual.ln_post(x) @ visual.proj


def text_embed(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """Frozen word embeddings of tokenised prompts: (C, L) -> (C, L, width)."""
    return clip.token_embedding(token_ids)


def text_encode_embeddings(
    clip: CLIP,
    embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    hook: BlockHook | None = None,
) -> torch.Tensor:
    """Text tower from word embeddings on: positional embedding, causal blocks, ``ln_final``,
    the end-of-text token (highest id in each row), text projection. (C, L, width) -> (C, embed).

    Positions after the last end-of-text token are dropped first: under the causal mask they
    cannot affect it, and prompts fill a fraction of the 77-token context (3-4x less work).
    """
    eot_index = token_ids.argmax(dim=-1)
    length = int(eot_index.max()) + 1
    x = embeddings[:, :length] + clip.positional_embedding[:length].to(embeddings.dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = run_blocks(clip.transformer.resblocks, x, attn_mask=mask, hook=hook)
    x = clip.ln_final(x)
    eot = x[torch.arange(x.shape[0], device=x.device), eot_index]
    projection = clip.text_projection
    return projection(eot) if isinstance(projection, nn.Linear) else eot @ projection
