"""data.masked_loss: each mask follows its image through resize, crop, flip, buckets and the latent cache,
missing masks are named, and with unmasked_weight=0 the loss has no gradient outside the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamtune.config import ConfigError, validate_config
from dreamtune.data.config import DataConfig
from dreamtune.data.dataset import build_dataset, collate
from dreamtune.data.loader import build_train_loader
from dreamtune.data.masks import MaskError, downsample_mask
from dreamtune.training.losses import loss_weights
from dreamtune.training.loop import Trainer

from .conftest import tiny_run_config
from .test_data_cache import conv, moments_encoder


def cfg(**keys) -> DataConfig:
    return DataConfig(**{"resolution": 32, "instance_prompt": "a photo of sks", "masked_loss": True, **keys})


def pattern(size: tuple[int, int], seed: int) -> np.ndarray:
    """A random 0/255 pattern (h, w) coarse enough to survive resizing, unique enough to show any misalignment."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 2, (h // 4 + 1, w // 4 + 1)) * 255
    return np.kron(coarse, np.ones((4, 4)))[:h, :w].astype(np.uint8)


def masked_folder(tmp_path, sizes, name="img", ext=".png", mask_ext=".png"):
    """Images whose red channel is their mask (so the transformed pixels show where the mask must be), masks apart."""
    images, masks = tmp_path / name, tmp_path / f"{name}_masks"
    images.mkdir()
    masks.mkdir()
    for i, size in enumerate(sizes):
        red = pattern(size, i)
        rgb = np.stack([red, np.full_like(red, 60), np.full_like(red, 90)], axis=-1)
        Image.fromarray(rgb).save(images / f"{i}{ext}")
        Image.fromarray(red).save(masks / f"{i}{mask_ext}")
    return images, masks


def red_as_mask(example) -> torch.Tensor:
    return (example["pixel_values"][:1] + 1) / 2


def test_alpha_mask_on_the_left_half_flips_to_the_right_half(tmp_path):
    folder = tmp_path / "alpha"
    folder.mkdir()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # an opaque red subject on the left, transparent background on the right
    Image.fromarray(rgba, "RGBA").save(folder / "0.png")
    data = build_dataset(cfg(instance_dir=str(folder), random_flip=True), seed=0)
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        example = data[0]
        mask = example["mask"][0]
        flipped = bool(mask[:, 16:].sum() > 0)
        seen.add(flipped)
        left, right = (mask[:, 16:], mask[:, :16]) if flipped else (mask[:, :16], mask[:, 16:])
        assert (left == 1).all() and (right == 0).all()
        green = example["pixel_values"][1]  # the subject is red (no green), the composited background white
        assert ((green < 0) == (mask > 0.5)).all(), "the mask sits on the (flipped) subject"
    assert seen == {True, False}


@pytest.mark.parametrize("center_crop", [True, False])
def test_mask_follows_resize_and_crop(tmp_path, center_crop):
    images, masks = masked_folder(tmp_path, [(96, 32), (64, 128), (50, 70)])
    data = build_dataset(cfg(instance_dir=str(images), mask_dir=str(masks), center_crop=center_crop,
                             random_flip=True), seed=3)
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            example = data[i]
            assert example["mask"].shape == (1, 32, 32)
            torch.testing.assert_close(example["mask"], red_as_mask(example), atol=1e-5, rtol=0)
    if not center_crop:  # the random crops really moved: not every epoch shows the same part of the wide image
        crops = set()
        for epoch in range(6):
            data.set_epoch(epoch)
            crops.add(data[0]["mask"].sum().item())
        assert len(crops) > 1


def test_mask_follows_buckets(tmp_path):
    images, masks = masked_folder(tmp_path, [(96, 48), (40, 80), (64, 64)])
    data = build_dataset(cfg(instance_dir=str(images), mask_dir=str(masks), bucketing=True, min_bucket_side=16,
                             max_bucket_side=64, bucket_step=8), seed=0)
    shapes = set()
    for i in range(len(data)):
        example = data[i]
        assert example["mask"].shape[1:] == example["pixel_values"].shape[1:]
        shapes.add(tuple(example["mask"].shape))
        torch.testing.assert_close(example["mask"], red_as_mask(example), atol=1e-5, rtol=0)
    assert len(shapes) == 3  # three aspect ratios, three buckets


def test_mask_file_with_another_extension_is_found(tmp_path):
    images, masks = masked_folder(tmp_path, [(32, 32)], ext=".jpg", mask_ext=".png")
    example = build_dataset(cfg(instance_dir=str(images), mask_dir=str(masks)), seed=0)[0]
    expected = torch.from_numpy(pattern((32, 32), 0).astype(np.float32) / 255)[None]
    torch.testing.assert_close(example["mask"], expected)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_mask_equals_uncached(tmp_path, mode):
    images, masks = masked_folder(tmp_path, [(96, 32), (48, 48)])
    c = cfg(instance_dir=str(images), mask_dir=str(masks), random_flip=True, cache_latents=mode,
            cache_dir=str(tmp_path / "cache"))
    encoder, _ = moments_encoder(conv(0))
    cached = build_train_loader(c, batch_size=2, seed=0, latent_encoder=encoder)
    plain = build_dataset(c.model_copy(update={"cache_latents": "none"}), seed=0)
    for epoch in range(3):
        cached.dataset.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            got, want = cached.dataset[i]["mask"], plain[i]["mask"]
            assert got.shape == (1, 4, 4)
            assert torch.equal(got, downsample_mask(want, (4, 4)))
            # what the objective weighs with: the same, cached or not
            assert torch.equal(loss_weights(got[None], (4, 4), 0.25), loss_weights(want[None], (4, 4), 0.25))
    batch = next(iter(cached))
    assert batch["mask"].shape == (2, 1, 4, 4) and batch["latent_moments"].shape[0] == 2


def test_collate_stacks_masks(tmp_path):
    images, masks = masked_folder(tmp_path, [(32, 32), (40, 32)])
    data = build_dataset(cfg(instance_dir=str(images), mask_dir=str(masks)), seed=0)
    batch = collate([data[0], data[1]])
    assert batch["mask"].shape == (2, 1, 32, 32)


def test_missing_mask_names_the_image_and_the_folder(tmp_path):
    images, masks = masked_folder(tmp_path, [(32, 32), (32, 32)])
    (masks / "1.png").unlink()
    with pytest.raises(MaskError, match=rf"no mask in data.mask_dir {masks} .*{images / '1.png'}"):
        build_dataset(cfg(instance_dir=str(images), mask_dir=str(masks)), seed=0)
    with pytest.raises(MaskError, match=rf"have no alpha channel: {images / '0.png'}.*data.mask_dir"):
        build_dataset(cfg(instance_dir=str(images)), seed=0)


def test_mask_keys_are_checked():
    with pytest.raises(ConfigError, match="data.mask_dir is set but data.masked_loss=false"):
        validate_config({"trainer": "lora", "data": {"mask_dir": "m"}})
    with pytest.raises(ConfigError, match="data.masked_loss .* needs data.instance_dir sources"):
        validate_config({"trainer": "lora", "data": {"masked_loss": True, "dataset": "some/dataset"}})
    with pytest.raises(ConfigError, match="unmasked_weight"):
        validate_config({"trainer": "lora", "data": {"unmasked_weight": 2}})


def test_masked_loss_gradients_come_only_from_the_masked_area(tiny_model_dir, tmp_path):
    """With unmasked_weight=0 the loss's gradient w.r.t. the UNet's prediction is zero outside the mask;
    with unmasked_weight>0 the background gets gradient too."""
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(2):
        rgba = np.full((32, 32, 4), (40 * i, 200, 90, 0), dtype=np.uint8)
        rgba[:, :16, 3] = 255  # the left half is the subject
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")

    def prediction_grads(weight: float) -> torch.Tensor:
        trainer = Trainer(tiny_run_config(
            "tiny_lora.yaml", tiny_model_dir, tmp_path / f"run-{weight}", "train.max_steps=1", "validation.prompts=[]",
            f"data.instance_dir={folder}", "data.masked_loss=true", f"data.unmasked_weight={weight}",
            "data.random_flip=false"))
        trainer._setup()
        grads = {}

        def keep_grad(module, args, out):
            out[0].register_hook(lambda g: grads.setdefault("pred", g.detach().clone()))

        hook = trainer.trained["unet"].register_forward_hook(keep_grad)
        loss, _ = trainer._train_step(next(iter(trainer.loader)), 0)
        loss.backward()
        hook.remove()
        trainer.ownership.release()
        return grads["pred"]

    masked = prediction_grads(0.0)
    half = masked.shape[-1] // 2  # the latent's left half is the image's left half
    assert (masked[..., :, half:] == 0).all(), "no gradient from the unmasked right half"
    assert (masked[..., :, :half] != 0).float().mean() > 0.9
    weighted = prediction_grads(0.5)
    assert (weighted[..., :, half:] != 0).float().mean() > 0.9


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_class_images_count_everywhere_beside_masked_instances(tmp_path, cache):
    images, masks = masked_folder(tmp_path, [(32, 32), (48, 32)])
    c = cfg(instance_dir=str(images), mask_dir=str(masks), cache_latents=cache)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (10, 200, 10)).save(class_dir / f"{i}.png")
    class_records = build_dataset(DataConfig(instance_dir=str(class_dir), instance_prompt="a dog", resolution=32),
                                  seed=0).records
    encoder, _ = moments_encoder(conv(0))
    loader = build_train_loader(c, batch_size=2, seed=0, class_records=class_records,
                                latent_encoder=encoder if cache != "none" else None)
    batch = next(iter(loader))
    instance, prior = batch["mask"][:2], batch["mask"][2:]
    assert len(batch["mask"]) == 4 and (prior == 1).all() and not (instance == 1).all()
