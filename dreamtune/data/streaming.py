"""A streamed `datasets` source (too large to hold): shuffle buffer per epoch, sharded by process.

There is no per-epoch shuffle by index: order comes from datasets' shuffle buffer seeded with
(seed, epoch). Resuming mid-epoch skips this process's first examples again, so the position is
exact with ``num_workers: 0`` and approximate with workers (each worker reads its own shards).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from .caption_rules import CaptionRules, base_caption, caption_rng, render_caption
from .config import DataConfig
from .images import BadImageError, apply_transform, plan_transform, to_tensor
from .sources import DataSourceError, SourceReport, cell_caption, check_columns, dataset_image, load_hf_dataset

log = logging.getLogger("dreamtune")


def _known_length(dataset: Any, source: Any) -> int | None:
    """The split's row count when the dataset's metadata (or its saved folder) states it."""
    try:
        return int(dataset.info.splits[source.dataset_split].num_examples)
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    if (Path(source.dataset) / "state.json").is_file() or (Path(source.dataset) / "dataset_dict.json").is_file():
        import datasets

        saved = datasets.load_from_disk(source.dataset)  # memory-mapped: counting rows reads no images
        return len(saved[source.dataset_split] if isinstance(saved, datasets.DatasetDict) else saved)
    return None


class StreamingImageDataset(IterableDataset):
    """Examples from a streamed dataset, for one process of ``num_replicas``."""

    def __init__(self, cfg: DataConfig, seed: int):
        sources = cfg.source_configs()
        if len(sources) != 1:
            raise DataSourceError("data.streaming: stream one dataset per run; data.sources has several")
        self.cfg, self.seed, self.source = cfg, seed, sources[0]
        self.rules = CaptionRules.from_source(self.source)
        self.hf = load_hf_dataset(self.source, streaming=True)
        columns = list(self.hf.column_names) if self.hf.column_names else list(next(iter(self.hf)))
        check_columns(columns, self.source)
        self.length = _known_length(self.hf, self.source)
        self.records: list = []  # not listable up front
        self.report = SourceReport(used=self.length or 0)
        self.epoch, self.skip, self.num_replicas, self.rank = 0, 0, 1, 0

    def shard(self, num_replicas: int, rank: int) -> None:
        """Read only this process's part (datasets' split_dataset_by_node)."""
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """New shuffle-buffer order for ``epoch``; ``skip`` drops this process's first examples."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        """Examples this process sees per epoch, when the dataset states its size (else 0)."""
        return -(-(self.length or 0) // self.num_replicas)

    def _stream(self) -> Any:
        from datasets.distributed import split_dataset_by_node

        stream = self.hf.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
        stream.set_epoch(self.epoch)
        if self.num_replicas > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.num_replicas)
        return stream

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        skip = self.skip if worker is None else self.skip // worker.num_workers
        size = (self.cfg.resolution, self.cfg.resolution)
        column = self.source.own_caption_column
        for index, row in enumerate(self._stream()):
            if index < skip:
                continue
            origin = f"{self.source.dataset}[stream {index}]"
            caption = base_caption(cell_caption(row.get(column)) if column else None, self.rules)
            if caption is None:
                continue
            try:
                image = dataset_image(row[self.source.image_column], origin)
            except BadImageError as err:
                log.warning("data: %s; skipped", err)
                continue
            rng = random.Random(f"image:{self.seed}:{self.epoch}:{self.rank}:{index}")
            flip = self.cfg.random_flip and rng.random() < 0.5
            transform = plan_transform(image.size, size, self.cfg.center_crop, flip, rng)
            text = render_caption(caption, self.rules, caption_rng(self.seed, self.epoch, index * 1009 + self.rank))
            yield {"pixel_values": to_tensor(apply_transform(image, transform)), "caption": text}


def build_streaming_dataset(cfg: DataConfig, seed: int) -> StreamingImageDataset:
    """The streamed dataset; columns are checked on the first row before any model loads."""
    try:
        cfg.require_source()
    except ValueError as err:
        raise DataSourceError(str(err)) from err
    return StreamingImageDataset(cfg, seed)
