"""Aspect-ratio buckets and the samplers: one bucket per batch, every image once per epoch, sharding, resume."""

from __future__ import annotations

import math

import pytest

from dreamtune.data.buckets import assign_buckets, make_buckets, nearest_bucket
from dreamtune.data.loader import build_train_loader
from dreamtune.data.sampler import BucketBatchSampler, ShardedShuffleSampler

from .test_data_helpers import cfg, write_image

SIZES = [(64, 64), (96, 48), (48, 96), (80, 64), (64, 80), (120, 40), (40, 120)]


def test_buckets_have_constant_area_and_step():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert nearest_bucket((300, 300), buckets) == (512, 512)


def test_no_upscale_keeps_small_images_small():
    assert assign_buckets([(200, 150)], 512, 256, 1024, 64, no_upscale=True) == [(192, 128)]
    assert assign_buckets([(2000, 1500)], 512, 256, 1024, 64, no_upscale=True) == [(576, 448)]


@pytest.fixture
def mixed_folder(tmp_path):
    for i in range(14):
        write_image(tmp_path / f"{i:02d}.png", size=SIZES[i % len(SIZES)], caption=f"image {i}")
    return tmp_path


def bucket_cfg(folder, **keys):
    return cfg(instance_dir=str(folder), bucketing=True, resolution=64, min_bucket_side=32, max_bucket_side=128,
               bucket_step=16, **keys)


def test_batches_come_from_one_bucket_and_cover_the_epoch(mixed_folder):
    loader = build_train_loader(bucket_cfg(mixed_folder), batch_size=2, seed=0)
    loader.set_epoch(0)
    captions = []
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch()
    for batch in batches:
        assert batch["pixel_values"].shape[-2:] in {(h, w) for w, h in set(loader.dataset.targets)}
        captions += batch["captions"]
    assert sorted(captions) == sorted(f"image {i}" for i in range(14))
    assert any(b["pixel_values"].shape[0] == 2 for b in batches)


def test_bucket_order_is_seeded_and_reshuffled(mixed_folder):
    def order(seed, epoch):
        sampler = build_train_loader(bucket_cfg(mixed_folder), batch_size=2, seed=seed).sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


def test_bucket_sampler_sharding_and_resume():
    buckets = [(64, 64)] * 8 + [(96, 32)] * 4 + [(32, 96)] * 4
    shards = [BucketBatchSampler(buckets, 2, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    seen = [[i for batch in s for i in batch] for s in shards]
    assert len(shards[0]) == len(shards[1]) == 4
    assert sorted(seen[0] + seen[1]) == list(range(16))  # each image to exactly one process
    for s in shards:
        for batch in s:
            assert len({buckets[i] for i in batch}) == 1
    full = list(shards[0])
    shards[0].set_epoch(3, skip=1)
    assert list(shards[0]) == full[1:] and len(shards[0]) == 3


def test_uneven_bucket_batches_pad_so_processes_stay_in_step():
    buckets = [(64, 64)] * 3
    shards = [BucketBatchSampler(buckets, 1, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    assert set(i for s in shards for b in s for i in b) == {0, 1, 2}


def test_two_process_loaders_each_image_once(mixed_folder):
    c = bucket_cfg(mixed_folder)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(c, batch_size=1, seed=1, num_replicas=2, rank=rank)
        loader.set_epoch(0)
        per_rank.append([cap for batch in loader for cap in batch["captions"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"image {i}" for i in range(14))


def test_sharded_sampler_two_replicas_each_index_once():
    shards = [ShardedShuffleSampler(10, seed=0, num_replicas=2, rank=r) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    a, b = list(shards[0]), list(shards[1])
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5


def test_bucketed_loader_with_workers_and_batch_size(mixed_folder):
    loader = build_train_loader(bucket_cfg(mixed_folder, num_workers=2), batch_size=3, seed=0)
    loader.set_epoch(1)
    total = sum(len(b["captions"]) for b in loader)
    assert total == 14 and loader.batches_per_epoch() == sum(
        math.ceil(len(g) / 3) for g in loader.sampler.groups.values())


@pytest.mark.parametrize("replicas", [1, 2])
def test_dataset_smaller_than_a_batch_fills_every_batch(tmp_path, capsys, replicas):
    """4 images at batch 8 (or 4 per process on 2 processes) train on full batches, each image equally often."""
    for i in range(4):
        write_image(tmp_path / f"{i}.png", caption=f"image {i}")
    batch = 8 // replicas
    seen = []
    for rank in range(replicas):
        loader = build_train_loader(cfg(instance_dir=str(tmp_path)), batch_size=batch, seed=0,
                                    num_replicas=replicas, rank=rank)
        loader.set_epoch(3)
        batches = [b["captions"] for b in loader]
        assert [len(b) for b in batches] == [batch] and loader.batches_per_epoch() == 1
        seen += batches[0]
    assert sorted(seen) == sorted(f"image {i}" for i in range(4) for _ in range(2))
    assert "4 examples per epoch but 8 per step" in capsys.readouterr().out


def test_dataset_of_a_whole_batch_is_not_padded(tmp_path, capsys):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", caption=f"image {i}")
    loader = build_train_loader(cfg(instance_dir=str(tmp_path)), batch_size=4, seed=0)
    loader.set_epoch(0)
    assert [sorted(b["captions"]) for b in loader] == [[f"image {i}" for i in range(4)]]
    assert "per step" not in capsys.readouterr().out
