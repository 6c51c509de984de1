"""Which parameters train, and putting saved trainable weights back."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.errors import CheckpointError


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def load_trainable(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy saved weights into ``model.trainable_state_dict()``; names and shapes must match exactly."""
    load_into(model.trainable_state_dict(), tensors, where)


def load_into(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into the (detached) tensors ``own``; names and shapes must match exactly."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where}: saved weights do not match this model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own if tensors[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: saved weights have other shapes: {wrong[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
