"""A seeded, resumable, process-sharded index order: each epoch a new shuffle from (seed, epoch)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardedShuffleSampler(Sampler[int]):
    """Indices for one process of ``num_replicas``; every process gets the same count per epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same data a straight run
    would. When the length does not divide, the first indices are reused to pad the last round.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    def per_replica(self) -> int:
        return math.ceil(self.length / self.num_replicas)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` drops this process's first indices (resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def epoch_order(self) -> list[int]:
        """The whole epoch's order before sharding."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_replica() * self.num_replicas
        return order + order[: total - len(order)]

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank :: self.num_replicas]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_replica() - self.skip
