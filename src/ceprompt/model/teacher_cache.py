"""Stage 1's teacher cache: the frozen teacher's global embedding of every repeatable training view, kept after it
is first computed.

The teacher is frozen, so an identical input gives an identical embedding. With flip-only augmentation (RAF-DB,
FERPlus) each training image has two views, sample x flip, and after both have been seen the teacher's forward
pass (a quarter of a stage-1 step) is skipped. Views whose augmentation does not repeat (``flip`` -1: AffectNet's
random affine) are always computed; the cache's memory is only taken once a repeatable view arrives.

Which views are known is kept on the CPU, beside the batch's sample indices (which come from the data loader on
the CPU): deciding what to compute needs no synchronisation with a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TeacherCache(nn.Module):
    """Embeddings of ``2 x n_samples`` views (sample index, flip), filled as they are first computed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.n_keys = dim, 0
        # values live with the model (moved by .to()); never synced between processes nor saved with the weights
        self.register_buffer("values", torch.zeros(0, dim), persistent=False)
        self.known = torch.zeros(0, dtype=torch.bool)

    def reserve(self, n_samples: int) -> None:
        self.n_keys = 2 * n_samples

    def _allocate(self) -> None:
        if len(self.values) != self.n_keys:
            self.values = torch.zeros(self.n_keys, self.dim, device=self.values.device)
            self.known = torch.zeros(self.n_keys, dtype=torch.bool)

    def targets(self, lower: torch.Tensor, index: torch.Tensor | None, flip: torch.Tensor | None,
                compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The teacher's embeddings (B, D) in fp32 for the batch whose shared lower-block tokens are ``lower``:
        known views from the cache, the others from ``compute`` (on those rows only), then remembered."""
        if index is None or flip is None or not self.n_keys:
            return compute(lower).float()
        flip, index = flip.cpu(), index.cpu()
        keys = torch.where(flip >= 0, 2 * index + flip, torch.full_like(flip, -1))
        repeatable = keys >= 0
        if not bool(repeatable.any()):  # CPU tensors: no wait for the device
            return compute(lower).float()
        self._allocate()
        known = repeatable & self.known[keys.clamp(min=0)]
        device = lower.device
        # rows chosen by index lists made on the CPU and sent along: a boolean mask on the device would make
        # the host wait for it (to count its rows)
        hit, miss = known.nonzero().flatten(), (~known).nonzero().flatten()
        out = torch.empty(len(keys), self.dim, device=device)
        if len(hit):
            out.index_copy_(0, hit.to(device, non_blocking=True),
                            self.values.index_select(0, keys[hit].to(self.values.device, non_blocking=True)).to(device))
        if len(miss):
            miss_dev = miss.to(device, non_blocking=True)
            fresh = compute(lower.index_select(0, miss_dev)).float()
            out.index_copy_(0, miss_dev, fresh)
            new = repeatable[miss].nonzero().flatten()  # positions within the computed rows
            if len(new):
                rows = keys[miss][new]
                self.values.index_copy_(0, rows.to(self.values.device, non_blocking=True),
                                        fresh.index_select(0, new.to(device, non_blocking=True)).to(self.values.device))
                self.known[rows] = True
        return out

    def state(self) -> dict[str, torch.Tensor]:
        if not len(self.values):
            return {}
        return {"cache": self.values.cpu(), "known": self.known.clone()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        cache, known = state.get("cache"), state.get("known")
        if not isinstance(cache, torch.Tensor) or not isinstance(known, torch.Tensor):
            return
        if cache.shape != (self.n_keys, self.dim) or known.shape != (self.n_keys,) or known.dtype != torch.bool:
            return  # another dataset or model: start empty, the embeddings are computed again
        self._allocate()
        self.values.copy_(cache)
        self.known.copy_(known)
