"""A seeded, resumable, process-sharded index order: each epoch a new shuffle from (seed, epoch)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def pad_to(items: list, total: int) -> list:
    """``items`` followed by its own first entries (cycling) until it holds ``total``."""
    padded = list(items)
    while len(padded) < total:
        padded += items[: total - len(padded)]
    return padded


class ShardedShuffleSampler(Sampler[int]):
    """Indices for one process of ``num_replicas``; every process gets the same count per epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same data a straight run
    would. When the length does not divide, the first indices are reused to pad the last round.
    ``min_per_replica`` (the batch size) cycles a dataset smaller than one batch per process
    until every process fills a whole batch: 4 images at batch 8 train on 8 samples a step, not 4.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 min_per_replica: int = 0):
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.min_per_replica = min_per_replica
        self.epoch, self.skip = 0, 0

    def per_replica(self) -> int:
        return max(math.ceil(self.length / self.num_replicas), self.min_per_replica)

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
        return pad_to(order, self.per_replica() * self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank :: self.num_replicas]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_replica() - self.skip


class BucketBatchSampler(Sampler[list[int]]):
    """Whole batches drawn from one bucket each; reshuffled per (seed, epoch); sharded by batch.

    Every process gets the same number of batches per epoch (the first batches are reused to pad the
    last round when the count does not divide), and ``skip`` drops this process's first batches.
    """

    def __init__(self, buckets: list, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if not buckets:
            raise ValueError("cannot sample from an empty dataset")
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0
        self.groups: dict = {}
        for index, bucket in enumerate(self.buckets):
            self.groups.setdefault(bucket, []).append(index)

    def num_batches(self) -> int:
        """Batches in a whole epoch, before sharding."""
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())

    def per_replica(self) -> int:
        return math.ceil(self.num_batches() / self.num_replicas)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` drops this process's first batches (resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def epoch_batches(self) -> list[list[int]]:
        """The whole epoch's batches before sharding, padded to a multiple of ``num_replicas``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = []
        for bucket in sorted(self.groups):
            group = self.groups[bucket]
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return pad_to(batches, self.per_replica() * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches()[self.rank :: self.num_replicas]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_replica() - self.skip
