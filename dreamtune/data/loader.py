"""The training loader: dataset + seeded sharded sampler + collate, as the loop consumes it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig
from .dataset import ImageCaptionDataset, build_dataset, collate
from .sampler import ShardedShuffleSampler
from .sources import Record


class PairedDataset(Dataset):
    """Instance examples each paired with a class example (DreamBooth prior preservation)."""

    def __init__(self, instance: ImageCaptionDataset, classes: ImageCaptionDataset):
        self.instance, self.classes = instance, classes

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.instance.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.instance[index % len(self.instance)])
        prior = self.classes[index % len(self.classes)]
        example["class_pixel_values"], example["class_caption"] = prior["pixel_values"], prior["caption"]
        return example


def collate_paired(examples: list[dict]) -> dict:
    """Instance examples first, class examples after, in one batch (one UNet forward for both)."""
    batch = collate(examples)
    classes = collate([{"pixel_values": e["class_pixel_values"], "caption": e["class_caption"]} for e in examples])
    return {
        "pixel_values": torch.cat([batch["pixel_values"], classes["pixel_values"]]),
        "captions": batch["captions"] + classes["captions"],
        "num_instance": len(examples),
    }


@dataclass
class TrainLoader:
    """What the loop iterates: call ``set_epoch`` before each epoch (``skip`` batches when resuming)."""

    dataset: ImageCaptionDataset
    sampler: ShardedShuffleSampler
    dataloader: DataLoader
    batch_size: int
    paired: PairedDataset | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        (self.paired or self.dataset).set_epoch(epoch)

    def batches_per_epoch(self) -> int:
        """Batches one process sees in a full epoch."""
        return math.ceil(self.sampler.per_replica() / self.batch_size)

    def __iter__(self):
        return iter(self.dataloader)


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    dataset: ImageCaptionDataset | None = None,
    class_records: list[Record] | None = None,
) -> TrainLoader:
    """The loader for one process; ``class_records`` adds a prior-preservation example to each one."""
    dataset = dataset or build_dataset(cfg, seed)
    paired = None
    if class_records:
        classes = ImageCaptionDataset(class_records, cfg.model_copy(update={"repeats": 1}), seed + 1)
        paired = PairedDataset(dataset, classes)
    source = paired or dataset
    sampler = ShardedShuffleSampler(len(source), seed, num_replicas=num_replicas, rank=rank)
    dataloader = DataLoader(
        source,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_paired if paired else collate,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        # Its own generator: starting an epoch must not draw from the global RNG, or a resumed
        # run (which restores that RNG) would diverge from a straight one.
        generator=torch.Generator().manual_seed(seed),
    )
    return TrainLoader(dataset=dataset, sampler=sampler, dataloader=dataloader, batch_size=batch_size, paired=paired)
