"""Samplers that give every process its share of an epoch, reproducibly from (seed, epoch).

Training shuffles (or, for AffectNet, draws classes equally with replacement) from a generator
seeded by ``seed + epoch``, identical on every process, and each process takes every
``world``-th index. Each draw also carries its own seed, from (seed, epoch, position in the epoch), which
seeds that image's random augmentation wherever it is loaded: a resumed run sees exactly the batches and
augmentations it would have seen, whatever the number of loader processes, and loader processes can live for
the whole run.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def draw_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one draw of an epoch: distinct for every (seed, epoch, position)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) % 2**63


class TrainSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, draw seed)`` pairs; :class:`~ceprompt.data.datasets.FERDataset` takes both."""

    def __init__(self, labels: Sequence[int], balanced: bool = False, world: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        self.labels = list(labels)
        self.balanced, self.world, self.rank, self.seed = balanced, world, rank, seed
        self.epoch = 0
        self.per_rank = math.ceil(len(self.labels) / world)
        counts = Counter(self.labels)
        self.weights = torch.tensor([1.0 / counts[y] for y in self.labels], dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.per_rank * self.world
        if self.balanced:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(len(self.labels), generator=g).tolist()
            order += order[: total - len(order)]  # pad so every process gets the same count
        return iter([(index, draw_seed(self.seed, self.epoch, position))
                     for position, index in enumerate(order)][self.rank::self.world])


class ShardSampler(Sampler[int]):
    """Evaluation: every index exactly once over all processes, no padding, in order, dealt in whole batches of
    ``batch`` (batch b to process b mod world): each batch is the one a single process forms, so every score is
    the number one process computes, whatever the number of processes."""

    def __init__(self, n: int, world: int = 1, rank: int = 0, batch: int = 1) -> None:
        starts = range(rank * batch, n, world * batch)
        self.indices = [i for start in starts for i in range(start, min(start + batch, n))]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
