"""The training loader: dataset + seeded sharded sampler + collate, as the loop consumes it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .caption_rules import CaptionRules, count_long_captions, longest_caption
from ..errors import ConfigError
from .config import DataConfig
from .dataset import ImageCaptionDataset, build_dataset, collate, image_key
from .latent_cache import LatentCache, LatentEncoder
from .sampler import BucketBatchSampler, ShardedShuffleSampler
from .sources import Record
from .streaming import StreamingImageDataset


class PairedDataset(Dataset):
    """Instance examples each paired with a class example (DreamBooth prior preservation)."""

    def __init__(self, instance: ImageCaptionDataset, classes: ImageCaptionDataset):
        self.instance, self.classes = instance, classes

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.instance.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def target_of(self, index: int) -> tuple[int, int]:
        return self.instance.target_of(index % len(self.instance))

    def class_targets(self) -> list[tuple[int, tuple[int, int]]]:
        """Each (class record index, size) a pairing can ask for: what the class images' latent cache holds."""
        classes = self.classes
        return [(classes.index_map[i % len(classes)], self.target_of(i)) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        example = dict(self.instance[index % len(self.instance)])
        example["prior"] = self.classes.example(index % len(self.classes), target=self.target_of(index))
        return example


def collate_paired(examples: list[dict]) -> dict:
    """Instance examples first, class examples after, in one batch (one UNet forward for both)."""
    batch = collate([{k: v for k, v in e.items() if k != "prior"} for e in examples])
    classes = collate([e["prior"] for e in examples])
    name = image_key(batch)
    paired = {
        name: torch.cat([batch[name], classes[name]]),
        "captions": batch["captions"] + classes["captions"],
        "num_instance": len(examples),
    }
    if "mask" in batch:
        paired["mask"] = torch.cat([batch["mask"], classes["mask"]])
    return paired


@dataclass
class TrainLoader:
    """What the loop iterates: call ``set_epoch`` before each epoch (``skip`` batches when resuming)."""

    dataset: Any
    sampler: Sampler | None
    dataloader: DataLoader
    batch_size: int
    paired: PairedDataset | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order and random draws; skip this process's first ``skip_batches`` batches."""
        if isinstance(self.sampler, BucketBatchSampler):
            self.sampler.set_epoch(epoch, skip=skip_batches)
        elif self.sampler is not None:
            self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        else:  # streaming: the dataset skips examples itself (approximate with workers)
            self.dataset.set_epoch(epoch, skip=skip_batches * self.batch_size)
            return
        (self.paired or self.dataset).set_epoch(epoch)

    def captions(self) -> set[str]:
        """Every caption a batch can carry, class captions included (for data.cache_text_embeddings)."""
        if isinstance(self.dataset, StreamingImageDataset):
            raise ConfigError("data.cache_text_embeddings needs every caption up front; a streamed dataset is read "
                             "once and never held. Set data.streaming=false or data.cache_text_embeddings=false")
        captions = self.dataset.distinct_captions()
        return captions | self.paired.classes.distinct_captions() if self.paired else captions

    def batches_per_epoch(self) -> int:
        """Batches one process sees in a full epoch (for a stream of unknown size: 0)."""
        if isinstance(self.sampler, BucketBatchSampler):
            return self.sampler.per_replica()
        if self.sampler is None:
            return math.ceil(len(self.dataset) / self.batch_size)
        return math.ceil(self.sampler.per_replica() / self.batch_size)

    def __iter__(self):
        return iter(self.dataloader)


def data_notice(message: str) -> None:
    """A one-off note about the data, on stdout beside the run's data report.

    Printed, not logged: with no logging configured, a warning also reached stderr through logging's
    last-resort handler, and the user read every note twice.
    """
    print(message, flush=True)


def note_small_dataset(examples: int, batch_size: int, num_replicas: int) -> None:
    """Say once that a dataset smaller than one step's batch is cycled to fill it."""
    per_step = batch_size * num_replicas
    data_notice(f"data: {examples} examples per epoch but {per_step} per step (batch {batch_size} x {num_replicas} "
                f"processes); each step repeats them to fill the batch. Set data.repeats or train.batch_size to choose.")


def default_cache_dir(cfg: DataConfig) -> Path:
    """data.cache_dir, else a hidden folder inside the first image folder (or ./.dreamtune_cache)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    folders = [s.instance_dir for s in cfg.source_configs() if s.instance_dir]
    return Path(folders[0] if folders else ".") / ".dreamtune_cache" / "latents"


def warn_long_captions(dataset: ImageCaptionDataset, tokenizer: Any, max_length: int = 77) -> int:
    """Warn once with how many images have captions (prefix and suffix included, with BOS and EOS) longer than
    ``max_length`` tokens: the text encoder reads no further."""
    long = count_long_captions([longest_caption(r.caption, r.rules or CaptionRules()) for r in dataset.records],
                               tokenizer, max_length)
    if long:
        longer = ", or set data.max_token_length to 225 (75-token windows)" if max_length < 227 else ""
        data_notice(f"data: {long} of {len(dataset.records)} images have captions longer than the text encoder's "
                    f"{max_length} tokens; the ends are cut off. Shorten them or move key words first{longer}.")
    return long


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    dataset: Any = None,
    class_records: list[Record] | None = None,
    latent_encoder: LatentEncoder | None = None,
    tokenizer: Any = None,
) -> TrainLoader:
    """The loader for one process; ``class_records`` adds a prior-preservation example to each one.

    ``latent_encoder`` (with data.cache_latents memory|disk) encodes every image, class images too, once;
    batches then carry ``latent_moments`` instead of ``pixel_values``. ``tokenizer`` enables the long-caption warning.
    """
    dataset = dataset if dataset is not None else build_dataset(cfg, seed)
    # Its own generator: starting an epoch must not draw from the global RNG, or a resumed
    # run (which restores that RNG) would diverge from a straight one.
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, StreamingImageDataset):
        dataset.shard(num_replicas, rank)
        dataloader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=cfg.num_workers)
        return TrainLoader(dataset=dataset, sampler=None, dataloader=dataloader, batch_size=batch_size)
    if tokenizer is not None and rank == 0:
        warn_long_captions(dataset, tokenizer, cfg.max_token_length + 2)
    cache = None
    if cfg.cache_latents != "none" and latent_encoder is not None:
        cache = LatentCache(cfg.cache_latents, default_cache_dir(cfg))
        dataset.use_cache(cache, latent_encoder)
    paired = None
    if class_records:
        classes = ImageCaptionDataset(class_records, cfg.model_copy(update={"repeats": 1}), seed + 1)
        paired = PairedDataset(dataset, classes)
        if cache is not None:  # class images get their own entries, at each size an instance pairs them with
            classes.use_cache(cache, latent_encoder, paired.class_targets())
    source = paired or dataset
    workers = dict(num_workers=cfg.num_workers, persistent_workers=False, generator=generator,
                   collate_fn=collate_paired if paired else collate)
    if cfg.bucketing:
        sampler = BucketBatchSampler([source.target_of(i) for i in range(len(source))], batch_size, seed,
                                     num_replicas=num_replicas, rank=rank)
        dataloader = DataLoader(source, batch_sampler=sampler, **workers)
    else:
        sampler = ShardedShuffleSampler(len(source), seed, num_replicas=num_replicas, rank=rank,
                                        min_per_replica=batch_size)
        if rank == 0 and len(source) < batch_size * num_replicas:
            note_small_dataset(len(source), batch_size, num_replicas)
        dataloader = DataLoader(source, batch_size=batch_size, sampler=sampler, **workers)
    return TrainLoader(dataset=dataset, sampler=sampler, dataloader=dataloader, batch_size=batch_size, paired=paired)
