"""The torch Dataset every trainer reads: transformed pixels (or cached latent moments) plus the caption,
and with data.masked_loss the loss mask, transformed with its image."""

from __future__ import annotations

import logging
import random
from typing import Iterable

import torch
from torch.utils.data import Dataset

from .buckets import assign_buckets
from ..errors import ConfigError
from .caption_rules import CaptionRules, caption_rng, longest_caption, render_caption
from .config import DataConfig
from .images import BadImageError, Transform, apply_transform, plan_transform, to_tensor
from .latent_cache import LatentCache, LatentEncoder, latent_key
from .masks import downsample_mask, mask_tensor
from .sources import Record, SourceReport, scan_records

log = logging.getLogger("dreamtune")


class ImageCaptionDataset(Dataset):
    """Each record repeated its ``repeats`` times; crops, flips and captions drawn per (seed, epoch, index)."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int, report: SourceReport | None = None):
        self.records = records
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.report = report or SourceReport(used=len(records))
        self.index_map = [i for i, record in enumerate(records) for _ in range(record.repeats)]
        self.targets = self._targets()
        self.cache: LatentCache | None = None
        self.fingerprint = ""

    def _targets(self) -> list[tuple[int, int]]:
        """Each record's training size (w, h): square, or its aspect-ratio bucket."""
        res = self.cfg.resolution
        if not self.cfg.bucketing:
            return [(res, res)] * len(self.records)
        for record in self.records:
            if record.size is None:
                record.size = record.load().size
        c = self.cfg
        return assign_buckets([r.size for r in self.records], res, c.min_bucket_side, c.max_bucket_side,
                              c.bucket_step, c.bucket_no_upscale)

    def __len__(self) -> int:
        return len(self.index_map)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/flips/captions for a new epoch (reproducible from the seed)."""
        self.epoch = epoch

    def target_of(self, index: int) -> tuple[int, int]:
        """The (w, h) example ``index`` is trained at."""
        return self.targets[self.index_map[index]]

    def caption_for(self, index: int) -> str:
        """The caption the trainer sees for example ``index`` this epoch."""
        record = self.records[self.index_map[index]]
        return render_caption(record.caption, record.rules or CaptionRules(), caption_rng(self.seed, self.epoch, index))

    def _plan(self, index: int, size: tuple[int, int], target: tuple[int, int]) -> Transform:
        rng = random.Random(f"image:{self.seed}:{self.epoch}:{index}")
        flip = self.cfg.random_flip and rng.random() < 0.5
        return plan_transform(size, target, self.cfg.center_crop, flip, rng)

    def use_cache(self, cache: LatentCache, encoder: LatentEncoder,
                  wanted: Iterable[tuple[int, tuple[int, int]]] | None = None) -> None:
        """Encode each (record index, target) of ``wanted`` (default: each record at its own size), flips too;
        examples then carry ``latent_moments`` (the latent distribution) instead of pixels."""
        flips = [False, True] if self.cfg.random_flip else [False]
        pending: dict[tuple[int, int], list[tuple[str, Record, Transform]]] = {}
        seen: set[str] = set()
        for index, target in wanted if wanted is not None else enumerate(self.targets):
            record = self.records[index]
            if record.size is None:
                record.size = record.load().size
            for flip in flips:
                transform = plan_transform(record.size, target, True, flip, random.Random(0))
                key = latent_key(encoder.fingerprint, record.cache_identity(), target, transform.key())
                if key not in seen and key not in cache:
                    seen.add(key)
                    pending.setdefault(target, []).append((key, record, transform))
        for items in pending.values():
            for start in range(0, len(items), encoder.batch_size):
                chunk = items[start : start + encoder.batch_size]
                pixels = torch.stack([to_tensor(apply_transform(r.load(), t)) for _, r, t in chunk])
                with torch.no_grad():
                    moments = encoder.encode(pixels)
                for (key, record, transform), moment in zip(chunk, moments):
                    cache.put(key, moment)
                    if record.mask is not None:
                        mask = mask_tensor(apply_transform(record.mask(), transform))
                        cache.put(self._mask_key(key, record), downsample_mask(mask, moment.shape[-2:]))
        self.cache, self.fingerprint = cache, encoder.fingerprint

    @staticmethod
    def _mask_key(latent_key_: str, record: Record) -> str:
        """The cache key of a record's loss mask at the latent's size, crop and flip (data.masked_loss)."""
        return latent_key("mask", record.mask.identity(), (0, 0), latent_key_)

    def distinct_captions(self) -> set[str]:
        """Every caption an epoch can give (for data.cache_text_embeddings): fixed captions, plus '' with dropout."""
        captions = set()
        for record in self.records:
            rules = record.rules or CaptionRules()
            if rules.shuffle_tags or rules.tag_dropout:
                raise ConfigError(
                    f"data.cache_text_embeddings needs fixed captions, but {record.origin} has tag shuffling or tag "
                    "dropout (data.shuffle_tags / data.tag_dropout); turn those off or set cache_text_embeddings=false"
                )
            captions.add(longest_caption(record.caption, rules))
            if rules.caption_dropout:
                captions.add("")
        return captions

    def example(self, index: int, target: tuple[int, int] | None = None) -> dict:
        """Example ``index`` at ``target`` (default: its own size): pixels or latent moments, and its caption."""
        record = self.records[self.index_map[index]]
        target = target or self.target_of(index)
        caption = self.caption_for(index)
        if self.cache is not None:
            transform = self._plan(index, record.size, target)
            key = latent_key(self.fingerprint, record.cache_identity(), target, transform.key())
            example = {"latent_moments": self.cache.get(key), "caption": caption}
            if self.cfg.masked_loss:
                latent_size = example["latent_moments"].shape[-2:]
                example["mask"] = (torch.ones(1, *latent_size) if record.mask is None
                                   else self.cache.get(self._mask_key(key, record)))
            return example
        try:
            image = record.load()
        except BadImageError as err:
            # The file changed after the scan: use a neighbour of the same size rather than kill a long run.
            log.warning("data: %s; using another image for this step", err)
            return self.example(self._neighbour(index, target), target)
        transform = self._plan(index, image.size, target)
        example = {"pixel_values": to_tensor(apply_transform(image, transform)), "caption": caption}
        if self.cfg.masked_loss:
            # Images without a mask of their own (prior-preservation class images) count everywhere.
            example["mask"] = (torch.ones(1, target[1], target[0]) if record.mask is None
                               else mask_tensor(apply_transform(record.mask(), transform)))
        return example

    def _neighbour(self, index: int, target: tuple[int, int]) -> int:
        """The next example of another record at the same size (for a file that broke after the scan)."""
        own = self.index_map[index]
        for step in range(1, len(self)):
            other = (index + step) % len(self)
            if self.index_map[other] != own and self.target_of(other) == target:
                return other
        raise BadImageError(f"{self.records[own].origin}: unreadable and no other image of its size to use")

    def __getitem__(self, index: int) -> dict:
        return self.example(index)


def image_key(example: dict) -> str:
    """Which image tensor an example or batch carries: cached ``latent_moments`` or ``pixel_values``."""
    return "latent_moments" if "latent_moments" in example else "pixel_values"


def collate(examples: list[dict]) -> dict:
    """Stack pixels (or latent moments); keep captions as strings for the trainer to tokenize."""
    name = image_key(examples[0])
    batch = {
        name: torch.stack([e[name] for e in examples]).contiguous(),
        "captions": [e["caption"] for e in examples],
    }
    if "mask" in examples[0]:
        batch["mask"] = torch.stack([e["mask"] for e in examples]).contiguous()
    return batch


def build_dataset(cfg: DataConfig, seed: int):
    """Scan the configured sources and wrap them; raises DataSourceError before any model loads."""
    if cfg.streaming:
        from .streaming import build_streaming_dataset

        return build_streaming_dataset(cfg, seed)
    records, report = scan_records(cfg)
    return ImageCaptionDataset(records, cfg, seed, report)
