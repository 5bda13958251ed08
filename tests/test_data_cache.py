"""Latent and text-embedding caches: cached == uncached (data and whole runs), invalidation, refusals."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamtune.data.dataset import build_dataset
from dreamtune.data.images import plan_transform
from dreamtune.data.latent_cache import LatentEncoder, latent_key, module_fingerprint
from dreamtune.data.loader import build_train_loader
from dreamtune.config import ConfigError, validate_config
from dreamtune.training.loop import Trainer

from .conftest import REPO_ROOT, tiny_run_config
from .test_data_helpers import cfg, write_image


def moments_encoder(conv: torch.nn.Conv2d) -> tuple[LatentEncoder, dict]:
    """A deterministic stand-in for the VAE: a strided conv as the mean, a std from it; counts images encoded."""
    calls = {"n": 0}

    def encode(pixels):
        calls["n"] += len(pixels)
        mean = conv(pixels) * 0.18215
        return torch.stack([mean, 0.05 + 0.1 * mean.abs()], dim=1)

    return LatentEncoder(encode, module_fingerprint(conv, {"kind": "conv"}), batch_size=2), calls


def folder(tmp_path, name="img", count=3):
    for i in range(count):
        write_image(tmp_path / name / f"{i}.png", size=(48 + 16 * i, 40), color=(i * 80, 50, 200), caption=f"c{i}")
    return tmp_path / name


def conv(seed: int) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, 8, stride=8)


def test_cached_moments_equal_uncached_including_flips(tmp_path):
    c = cfg(instance_dir=str(folder(tmp_path)), random_flip=True, cache_latents="memory")
    encoder, calls = moments_encoder(conv(0))
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
            torch.testing.assert_close(example["latent_moments"], expected.detach())
    batch = next(iter(cached))
    assert batch["latent_moments"].shape == (1, 2, 4, 4, 4) and "pixel_values" not in batch


def test_disk_cache_reused_and_invalidated(tmp_path):
    images = folder(tmp_path)
    c = cfg(instance_dir=str(images), cache_latents="disk", cache_dir=str(tmp_path / "cache"))
    encoder, calls = moments_encoder(conv(0))
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=encoder)
    assert calls["n"] == 3
    encoder2, calls2 = moments_encoder(conv(0))  # same weights: same fingerprint, nothing recomputed
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=encoder2)
    assert calls2["n"] == 0
    changed, calls3 = moments_encoder(conv(1))  # other weights: other fingerprint
    assert changed.fingerprint != encoder.fingerprint
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=changed)
    assert calls3["n"] == 3
    bigger, calls4 = moments_encoder(conv(0))
    build_train_loader(c.model_copy(update={"resolution": 64}), batch_size=1, seed=0, latent_encoder=bigger)
    assert calls4["n"] == 3
    write_image(images / "0.png", size=(48, 40), color=(255, 255, 255), caption="c0")  # edited image
    again, calls5 = moments_encoder(conv(0))
    build_train_loader(c, batch_size=1, seed=0, latent_encoder=again)
    assert calls5["n"] == 1


def test_old_mean_only_cache_files_are_not_reused(tmp_path):
    """A cache written by the mean-only layout (key without the layout tag) is ignored, not misread."""
    c = cfg(instance_dir=str(folder(tmp_path)), cache_latents="disk", cache_dir=str(tmp_path / "cache"))
    encoder, calls = moments_encoder(conv(0))
    dataset = build_dataset(c, seed=0)
    for record, target in zip(dataset.records, dataset.targets):
        transform = plan_transform(record.load().size, target, True, False, random.Random(0))
        text = f"{encoder.fingerprint}|{record.cache_identity()}|{target[0]}x{target[1]}|{transform.key()}"
        old = hashlib.sha256(text.encode()).hexdigest()
        assert old != latent_key(encoder.fingerprint, record.cache_identity(), target, transform.key())
        (tmp_path / "cache" / old[:2]).mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.zeros(4, 4, 4)}, str(tmp_path / "cache" / old[:2] / f"{old}.safetensors"))
    loader = build_train_loader(c, batch_size=1, seed=0, dataset=dataset, latent_encoder=encoder)
    assert calls["n"] == 3
    written = [p for p in (tmp_path / "cache").rglob("*.safetensors") if "moments" in load_file(str(p))]
    assert len(written) == 3
    assert loader.dataset[0]["latent_moments"].shape == (2, 4, 4, 4)


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
    encoder, calls = moments_encoder(conv(0))
    loader = build_train_loader(c, batch_size=2, seed=0, latent_encoder=encoder)
    loader.set_epoch(0)
    assert sum(len(b["captions"]) for b in loader) == 3


@pytest.mark.parametrize("bucketing", [False, True])
def test_prior_preservation_class_images_are_cached(tmp_path, bucketing):
    """Class images get their own entries at each size an instance pairs them with; batches match uncached."""
    keys = dict(instance_dir=str(folder(tmp_path)), random_flip=True, cache_latents="memory")
    if bucketing:
        keys.update(bucketing=True, resolution=32, min_bucket_side=16, max_bucket_side=64, bucket_step=16)
    c = cfg(**keys)
    class_records = build_dataset(cfg(instance_dir=str(folder(tmp_path, "class", 2))), seed=0).records
    encoder, calls = moments_encoder(conv(0))
    cached = build_train_loader(c, batch_size=2, seed=0, class_records=class_records, latent_encoder=encoder)
    needed = {(i, t) for i, t in cached.paired.class_targets()}
    assert calls["n"] == 2 * (3 + len(needed))  # instance and class images, plain and flipped
    plain = build_train_loader(c.model_copy(update={"cache_latents": "none"}), batch_size=2, seed=0,
                               class_records=class_records)
    for epoch in range(2):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for got, want in zip(cached, plain, strict=True):
            assert got["captions"] == want["captions"] and got["num_instance"] == want["num_instance"]
            assert "pixel_values" not in got and len(got["latent_moments"]) == 2 * got["num_instance"]
            with torch.no_grad():
                torch.testing.assert_close(got["latent_moments"], encoder.encode(want["pixel_values"]))


def test_distinct_captions_cover_every_epoch(tmp_path):
    """What the text cache encodes: each fixed caption, plus '' when caption dropout is on."""
    c = cfg(instance_dir=str(folder(tmp_path)), caption_prefix="p", caption_dropout=0.5)
    dataset = build_dataset(c, seed=0)
    distinct = dataset.distinct_captions()
    assert distinct == {"p c0", "p c1", "p c2", ""}
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        seen |= {dataset[i]["caption"] for i in range(len(dataset))}
    assert seen == distinct


# -- refusals -------------------------------------------------------------------------------------
def run_error(data: dict, trainer: str = "lora", **sections) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config({"trainer": trainer, "data": data, **sections})
    return str(info.value)


def test_latent_cache_refusals_say_why_and_what_to_do():
    message = run_error({"cache_latents": "memory", "center_crop": False})
    assert "data.center_crop=true" in message and "random crop differs every epoch" in message
    assert "data.cache_latents=none" in message
    message = run_error({"cache_latents": "disk", "streaming": True, "dataset": "x"})
    assert "stream is read once" in message and "data.streaming=false" in message


def test_text_cache_refusals_name_the_key():
    on = {"cache_text_embeddings": True}
    assert "data.shuffle_tags=true reorders the tags" in run_error({**on, "shuffle_tags": True})
    assert "data.tag_dropout=0.2 drops different tags" in run_error({**on, "tag_dropout": 0.2})
    sources = [{"instance_dir": "a"}, {"instance_dir": "b", "tag_dropout": 0.3}]
    assert "data.sources[1].tag_dropout=0.3" in run_error({**on, "sources": sources})
    assert "data.streaming=false" in run_error({**on, "streaming": True, "dataset": "x"})
    message = run_error(on, trainer="textual_inversion")
    assert "trainer: textual_inversion" in message and "data.cache_text_embeddings=false" in message
    message = run_error(on, lora={"train_text_encoder": True})
    assert "lora.train_text_encoder=true" in message and "Set lora.train_text_encoder=false" in message
    message = run_error(on, trainer="dreambooth", dreambooth={"train_text_encoder": True})
    assert "dreambooth.train_text_encoder=true" in message
    # Caption dropout keeps captions fixed ('' is one more), and a frozen text encoder is fine.
    assert validate_config({"trainer": "lora", "data": {**on, "caption_dropout": 0.1}}).data.cache_text_embeddings
    assert validate_config({"trainer": "dreambooth", "data": on}).data.cache_text_embeddings


# -- whole runs on the tiny model: cached runs train like uncached ones, to float rounding ------------
def captioned_toys(tmp_path: Path) -> Path:
    """The shipped sks_toy images with three different captions."""
    target = tmp_path / "toys"
    target.mkdir()
    for i, image in enumerate(sorted((REPO_ROOT / "examples" / "sks_toy").glob("*.png"))):
        shutil.copy(image, target / image.name)
        (target / image.name).with_suffix(".txt").write_text(f"a photo of sks toy, view {i % 3}")
    return target


#: Both caches off (their default, auto, turns them on for these runs); a test's overrides come after.
UNCACHED = ("data.cache_latents=none", "data.cache_text_embeddings=false")


def run_lora(model_dir: Path, out: Path, *overrides: str) -> Trainer:
    """A 3-step LoRA run; ``trainer.initial`` holds the adapters before training and ``trainer.calls`` counts
    the VAE encodes and text-encoder forwards during the training steps."""
    cfg = tiny_run_config(
        "tiny_lora.yaml", model_dir, out, "train.max_steps=3", "train.learning_rate=5.0e-3",
        "train.lr_warmup_steps=0", "train.save_every=0", "validation.every=0", "validation.prompts=[]",
        *UNCACHED, *overrides,
    )
    trainer = Trainer(cfg)
    setup = trainer._setup

    def spy_setup():
        setup()  # the caches fill here; only calls during the training steps count
        trainer.initial, trainer.calls = lora_weights(trainer), {"vae": 0, "text_encoder": 0}
        m, encode = trainer.models, trainer.models.vae.encode

        def counted_encode(*args, **kwargs):
            trainer.calls["vae"] += 1
            return encode(*args, **kwargs)

        def count_text_encoder(*args):
            trainer.calls["text_encoder"] += 1

        m.vae.encode = counted_encode
        m.text_encoder.register_forward_hook(count_text_encoder)

    trainer._setup = spy_setup
    trainer.run()
    return trainer


def lora_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    unet = trainer.unwrapped()["unet"]
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if "lora" in n}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """Both runs moved the weights alike, up to float noise (which Adam amplifies where gradients are ~0)."""
    # Measured: cached vs uncached differ by 2e-5 (LoRA) and 1.2e-4 (DreamBooth) of the update; the old
    # mean-only cache by 0.6 and 0.8.
    assert a.keys() == b.keys() and a
    delta_a = torch.cat([(a[k].float() - base[k].float()).flatten() for k in a])
    delta_b = torch.cat([(b[k].float() - base[k].float()).flatten() for k in a])
    assert delta_a.norm() > 0, "the run did not train"
    assert (delta_a - delta_b).norm() <= 5e-3 * delta_a.norm()


def test_lora_run_with_cached_latents_matches_uncached(tiny_model_dir, tmp_path):
    """The cache keeps the VAE's distribution and the loop samples it per sample: same weights, flips included."""
    plain = run_lora(tiny_model_dir, tmp_path / "plain")
    cached = run_lora(tiny_model_dir, tmp_path / "cached", "data.cache_latents=memory")
    assert plain.calls["vae"] == 3 and cached.calls["vae"] == 0
    assert cached.models.vae.device.type == "cpu"  # everything cached, no validation: the VAE left the device
    assert cached.cfg.data.random_flip
    assert_same_weights(lora_weights(cached), lora_weights(plain), plain.initial)


def test_lora_run_with_cached_text_embeddings_matches_without_text_encoder_calls(tiny_model_dir, tmp_path):
    toys = captioned_toys(tmp_path)
    overrides = [f"data.instance_dir={toys}", "data.caption_dropout=0.3"]
    plain = run_lora(tiny_model_dir, tmp_path / "plain", *overrides)
    cached = run_lora(tiny_model_dir, tmp_path / "cached", *overrides, "data.cache_text_embeddings=true")
    assert plain.calls["text_encoder"] == 3 and cached.calls["text_encoder"] == 0
    assert len(cached.text_cache) == 4  # three captions and the dropped-out ''
    assert cached.models.text_encoder.device.type == "cpu"
    assert_same_weights(lora_weights(cached), lora_weights(plain), plain.initial)


def test_dreambooth_prior_preservation_with_both_caches_matches_uncached(tiny_model_dir, tmp_path):
    """Instance and class images cached (latents and captions): the UNet trains as it does uncached."""
    class_dir = tmp_path / "class"  # two real class images: neither run generates any
    class_dir.mkdir()
    for i, image in enumerate(sorted((REPO_ROOT / "examples" / "sks_toy").glob("*.png"))[:2]):
        shutil.copy(image, class_dir / f"real_{i}.png")

    def run(out: Path, *overrides: str) -> Trainer:
        cfg = tiny_run_config(
            "tiny_dreambooth.yaml", tiny_model_dir, out, "train.max_steps=2", "train.learning_rate=1.0e-3",
            "train.save_every=0", "validation.every=0", "validation.prompts=[]", "dreambooth.train_text_encoder=false",
            "dreambooth.ema=false", "dreambooth.use_ema_for=raw", f"dreambooth.class_dir={class_dir}",
            "dreambooth.num_class_images=2", "export.dtype=fp32", *UNCACHED, *overrides,
        )
        trainer = Trainer(cfg)
        trainer.run()
        return trainer

    plain = run(tmp_path / "plain")
    cached = run(tmp_path / "cached", "data.cache_latents=memory", "data.cache_text_embeddings=true")
    assert cached.loader.paired is not None and cached.loader.paired.classes.cache is not None
    assert len(cached.text_cache) == 2  # the instance prompt and the class prompt
    base = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    a, b = (dict(t.models.unet.state_dict()) for t in (cached, plain))
    assert_same_weights(a, b, base)


@pytest.mark.parametrize("recipe, overrides, latents, text", [
    ("tiny_lora.yaml", [], "memory", True),
    ("tiny_lora.yaml", ["data.center_crop=false"], "none", True),
    ("tiny_lora.yaml", ["lora.train_text_encoder=true"], "memory", False),
    ("tiny_lora.yaml", ["data.shuffle_tags=true"], "memory", False),
    ("tiny_lora.yaml", ["data.cache_latents=disk", "data.cache_text_embeddings=false"], "disk", False),
    ("tiny_ti.yaml", [], "memory", False),
    ("tiny_dreambooth.yaml", [], "memory", False),
    ("tiny_dreambooth.yaml", ["dreambooth.train_text_encoder=false"], "memory", True),
])
def test_auto_caches_turn_on_wherever_valid(recipe, overrides, latents, text, tiny_model_dir, tmp_path):
    cfg = tiny_run_config(recipe, tiny_model_dir, tmp_path, *overrides)
    assert (cfg.data.cache_latents, cfg.data.cache_text_embeddings) == (latents, text)


def test_default_run_uses_both_caches_and_says_so(tiny_model_dir, tmp_path, capsys):
    trainer = run_lora(tiny_model_dir, tmp_path, "data.cache_latents=auto", "data.cache_text_embeddings=auto")
    assert trainer.calls == {"vae": 0, "text_encoder": 0}
    assert "caches: latents in memory, text embeddings on" in capsys.readouterr().out


def test_fingerprint_ignores_where_encoder_outputs_come_from(tiny_model_dir, tmp_path):
    from dreamtune.training.ownership import run_fingerprint

    default = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path)
    uncached = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *UNCACHED)
    other = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *UNCACHED, "data.random_flip=false")
    assert run_fingerprint(default) == run_fingerprint(uncached) != run_fingerprint(other)
