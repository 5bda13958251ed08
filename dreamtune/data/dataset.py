"""The torch Dataset every trainer reads: transformed pixels plus the caption for each record."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .images import BadImageError, prepare_image
from .sources import Record, SourceReport, scan_records


class ImageCaptionDataset(Dataset):
    """Records repeated ``cfg.repeats`` times; crop and flip are drawn per (seed, epoch, index)."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int, report: SourceReport | None = None):
        self.records = records
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.report = report or SourceReport(used=len(records))

    def __len__(self) -> int:
        return len(self.records) * self.cfg.repeats

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/flips for a new epoch (reproducible from the seed)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        record = self.records[index % len(self.records)]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        try:
            image = record.load()
        except BadImageError:
            # The file changed after the scan: use a neighbour rather than kill a long run.
            return self[(index + 1) % len(self)]
        flip = self.cfg.random_flip and rng.random() < 0.5
        pixels = prepare_image(image, self.cfg.resolution, self.cfg.center_crop, flip, rng)
        return {"pixel_values": pixels, "caption": record.caption}


def collate(examples: list[dict]) -> dict:
    """Stack pixels; keep captions as strings for the trainer to tokenize."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "captions": [e["caption"] for e in examples],
    }


def build_dataset(cfg: DataConfig, seed: int) -> ImageCaptionDataset:
    """Scan the configured source and wrap it; raises DataSourceError before any model loads."""
    records, report = scan_records(cfg)
    return ImageCaptionDataset(records, cfg, seed, report)
