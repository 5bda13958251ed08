"""Latent cache: cached == uncached, flips cached, a changed VAE or resolution recomputes, disk reuse."""

from __future__ import annotations

import torch

from dreamtune.data.dataset import build_dataset
from dreamtune.data.latent_cache import LatentEncoder, module_fingerprint
from dreamtune.data.loader import build_train_loader

from .test_data_helpers import cfg, write_image


def pool_encoder(conv: torch.nn.Conv2d) -> LatentEncoder:
    """A deterministic stand-in for the VAE: a strided conv, fingerprinted like a real model."""
    calls = {"n": 0}

    def encode(pixels):
        calls["n"] += len(pixels)
        return conv(pixels) * 0.18215

    encoder = LatentEncoder(encode, module_fingerprint(conv, {"kind": "conv"}), batch_size=2)
    return encoder, calls


def folder(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png", size=(48 + 16 * i, 40), color=(i * 80, 50, 200), caption=f"c{i}")
    return tmp_path / "img"


def conv(seed: int) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, 8, stride=8)


def test_cached_latents_equal_uncached_including_flips(tmp_path):
    c = cfg(instance_dir=str(folder(tmp_path)), random_flip=True, cache_latents="memory")
    encoder, calls = pool_encoder(conv(0))
    cached = build_train_loader(c, batch_size=1, seed=0, latent_encoder=encoder)
    assert calls["n"] == 6  # 3 images x (plain, flipped)
    plain = build_dataset(c.model_copy(update={"cache_latents": "none"}), seed=0)
    for epoch in range(3):
        cached.dataset.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            expected = encoder.encode(plain[i]["pixel_values"][None])[0]
            example = cached.dataset[i]
            assert "pixel_values" not in example and example["caption"] == plain[i]["caption"]
            torch.testing.assert_close(example["latents"], expected.detach())
    batch = next(iter(cached))
    assert batch["latents"].shape == (1, 4, 4, 4) and "pixel_values" not in batch


def test_disk_cache_reused_and_invalidated(tmp_path):
    images = folder(tmp_path)
    c = cfg(instance_dir=str(images), cache_latents="disk", cache_dir=str(tmp_path / "cache"))
    encoder, calls = pool_encoder(conv(0))
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=encoder)
    assert calls["n"] == 3
    encoder2, calls2 = pool_encoder(conv(0))  # same weights: same fingerprint, nothing recomputed
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=encoder2)
    assert calls2["n"] == 0
    changed, calls3 = pool_encoder(conv(1))  # other weights: other fingerprint
    assert changed.fingerprint != encoder.fingerprint
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=changed)
    assert calls3["n"] == 3
    bigger, calls4 = pool_encoder(conv(0))
    build_train_loader(c.model_copy(update={"resolution": 64}), batch_size=1, seed=0, latent_encoder=bigger)
    assert calls4["n"] == 3
    write_image(images / "0.png", size=(48, 40), color=(255, 255, 255), caption="c0")  # edited image
    again, calls5 = pool_encoder(conv(0))
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=again)
    assert calls5["n"] == 1


def test_fingerprint_sees_config_and_weights():
    a = conv(0)
    assert module_fingerprint(a, {"x": 1}) == module_fingerprint(a, {"x": 1})
    assert module_fingerprint(a, {"x": 1}) != module_fingerprint(a, {"x": 2})
    with torch.no_grad():
        a.weight[0, 0, 0, 0] += 1
    assert module_fingerprint(a, {"x": 1}) != module_fingerprint(conv(0), {"x": 1})


def test_bucketed_cache(tmp_path):
    c = cfg(instance_dir=str(folder(tmp_path)), cache_latents="memory", bucketing=True, resolution=32,
            min_bucket_side=16, max_bucket_side=64, bucket_step=16)
    encoder, calls = pool_encoder(conv(0))
    loader = build_train_loader(c, batch_size=2, seed=0, latent_encoder=encoder)
    loader.set_epoch(0)
    assert sum(len(b["captions"]) for b in loader) == 3
