"""Forward passes through open_clip's CLIP towers, split where CEPrompt needs to reach in.

open_clip's ``encode_image``/``encode_text`` run a tower end to end. CEPrompt needs the
pieces: the token sequence before the blocks (to append prompts), each block on its own
(to replace prompt slots before it, or to stop at ``fix_layer``), and ``ln_post`` plus the
projection applied to *every* token (the local embeddings).

The blocks are open_clip's, with their own weights and modules; :func:`block_forward` runs one
with the attention's input projection on the batch-first tokens as they are. ``nn.MultiheadAttention``
transposes them to sequence-first first, and a linear layer on that strided view cannot be one
matrix product: torch then multiplies per token position against a copy of the weight for each
position (``bmm`` on a (T, width, 3 width) expansion). Under bf16 autocast with frozen weights that
copy was 70% of a stage-2 forward and made bf16 slower than fp32.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

# Called with (block index, tokens) before that block runs; returns the tokens to feed it.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def vision_embed(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + positional embedding, before ``ln_pre``: (B, 1 + N, width).

    The patch embedding stays fp32 under autocast: rounding the pixels to bf16's 8 bits of mantissa was
    half of the bf16-vs-fp32 difference in the demo models' probabilities (0.021 -> 0.012 at most), for
    about 1% of a ViT-B/16's operations."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = visual.conv1(images.float())
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    return x + visual.positional_embedding.to(x.dtype)


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attn(x, x, x, need_weights=False)[0]`` for batch-first ``x`` (B, T, width), the projections on the
    contiguous tokens (one matrix product each) and attention through ``scaled_dot_product_attention``."""
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                         dropout_p=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def _is_plain_block(block: nn.Module) -> bool:
    """An open_clip block that :func:`block_forward` computes exactly: batch-first self-attention."""
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn)


def block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One open_clip residual block on batch-first tokens; any other block type is simply called."""
    if not _is_plain_block(block):
        return block(x, attn_mask=attn_mask)
    x = x + block.ls_1(self_attention(block.attn, block.ln_1(x), attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


BlockPass = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@functools.cache
def compiled_block_forward() -> BlockPass:
    """:func:`block_forward` through ``torch.compile``: one compiled graph serves every block of a width
    (the block's weights are graph inputs, not constants)."""
    return torch.compile(block_forward)


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    first_index: int = 0,
    attn_mask: torch.Tensor | None = None,
    hook: BlockHook | None = None,
    grad_checkpointing: bool = False,
    block_pass: BlockPass = block_forward,
) -> torch.Tensor:
    """Run ``blocks`` in order; ``first_index`` is the absolute index of ``blocks[0]`` for the hook.
    ``block_pass`` runs one block (:func:`block_forward`, or its compiled form)."""
    for offset, block in enumerate(blocks):
        if hook is not None:
            x = hook(first_index + offset, x)
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block_pass, block, x, attn_mask, use_reentrant=False)
        else:
            x = block_pass(block, x, attn_mask)
    return x


def vision_project(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``ln_post`` and the output projection on every token: (B, T, width) -> (B, T, embed).

    In fp32 under autocast: the head compares these embeddings with the class text by cosine, and a bf16
    projection was half of the bf16-vs-fp32 difference in a tiny model's probabilities (0.031 -> 0.016 at
    most), for about 0.5% of a ViT-B/16's operations."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return visual.ln_post(x.float()) @ visual.proj


def text_embed(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """Frozen word embeddings of tokenised prompts: (C, L) -> (C, L, width)."""
    return clip.token_embedding(token_ids)


def text_encode_embeddings(
    clip: CLIP,
    embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    hook: BlockHook | None = None,
    block_pass: BlockPass = block_forward,
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
    x = run_blocks(clip.transformer.resblocks, x, attn_mask=mask, hook=hook, block_pass=block_pass)
    x = clip.ln_final(x)
    eot = x[torch.arange(x.shape[0], device=x.device), eot_index]
    projection = clip.text_projection
    return projection(eot) if isinstance(projection, nn.Linear) else eot @ projection


def store_block_matrices(blocks: Sequence[nn.Module], dtype: torch.dtype) -> None:
    """Keep the matrices and biases of ``blocks``' linear layers (attention projections, MLP) in ``dtype``, in
    place, for inference under autocast to that dtype; layer norms stay fp32.

    Autocast converts an fp32 weight at every call and keeps the copy only for weights that require grad, so a
    frozen model paid the conversion of every block's weights per forward: 14% of a ViT-B/16 image at batch 1
    under bf16 on CPU. The products are the same either way (autocast rounds the weights to ``dtype`` too), but
    the blocks then expect autocast: without it their matrices no longer match fp32 inputs."""
    with torch.no_grad():
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
                elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                    module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
                    if module.in_proj_bias is not None:
                        module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
