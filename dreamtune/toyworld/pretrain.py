"""Pretrain the toy-world base model from scratch: VAE, then CLIP text encoder + UNet together.

Everything is drawn from one seed, so `scripts/pretrain_toyworld.py --seed 0` rebuilds the
committed weights. The result is an ordinary SD 1.x diffusers folder that dreamtune trains on.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from ..models.tiny import TINY_RECIPE, assemble_pipeline, clip_text_encoder, learn_bpe
from . import world
from .classifier import accuracy, round_trip_scores, save_classifier, train_classifier, vae_round_trip

TOY_RECIPE = {
    "resolution": world.RESOLUTION,
    "bpe_merges": 300,
    "unet": {
        "sample_size": world.RESOLUTION // 4,
        "in_channels": 4,
        "out_channels": 4,
        # Four levels down to 1x1: the corners of the 2x2 level give the UNet a sense of place.
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [48, 96, 96, 96],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 2,  # diffusers reads this as the number of heads
        "norm_num_groups": 16,
    },
    "vae": {
        "sample_size": world.RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
    },
    "scheduler": TINY_RECIPE["scheduler"],
    "vae_steps": 1200,
    "vae_batch": 32,
    "classifier_steps": 1200,
    "images": 30000,
    "unet_steps": 3000,
    "unet_batch": 128,
    "learning_rate": 1e-3,
    "caption_dropout": 0.1,
    # Every caption names the position: at 0.6 the model learned to ignore it (19% right, chance 20%).
    "caption_position_rate": 1.0,
    # Share of captions naming the colour. At 1.0 (the committed model) "a photo of a circle" draws
    # a square 97% of the time and shapes without a colour come out right about half the time. A
    # lower rate fixes that (0.8: 90%) but costs the trainers more than it gives: LoRA's concept
    # fidelity more than halves and DreamBooth with prior preservation loses the concept
    # (measured in docs/benchmarks.md, "The base model"), so every caption names the colour.
    "caption_color_rate": 1.0,
    "min_snr_gamma": 5.0,
    "ema_decay": 0.999,
    "quality_per_prompt": 4,  # samples per held-out caption in the final quality check
    "shape_only_per_shape": 32,  # "a photo of a <shape>" samples per shape in the final check
}


def build_tokenizer(merges: int, seed: int):
    """A CLIP BPE tokenizer whose merges come from toy-world captions (so 'sks' stays rare)."""
    from transformers import CLIPTokenizer

    vocab, learned = learn_bpe(world.caption_corpus(seed), merges)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in learned], model_max_length=77)


def train_vae(images: torch.Tensor, recipe: dict, seed: int, log, device: str = "cpu") -> nn.Module:
    """An autoencoder (AutoencoderKL, tiny KL weight) that keeps flat shapes and colours crisp."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**recipe["vae"]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps, batch = recipe["vae_steps"], recipe["vae_batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every image, unscaled."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_denoiser(tokenizer, vae, latents, scenes, recipe: dict, seed: int, log, probe=None,
                   device: str = "cpu"):
    """CLIP text encoder and UNet trained together on epsilon prediction, min-SNR weighted, with EMA."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..training.objective import min_snr_weights

    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**recipe["unet"]).to(device)
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(tokenizer, recipe["text_encoder"]).to(device)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in recipe["scheduler"].items()
                                       if k not in ("skip_prk_steps", "set_alpha_to_one")})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["learning_rate"], weight_decay=0.01)
    steps, batch = recipe["unet_steps"], recipe["unet_batch"]
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    mean, std = latents
    scale = recipe["scaling_factor"]
    rng = random.Random(seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        texts = ["" if rng.random() < recipe["caption_dropout"]
                 else world.caption(scenes[i], rng, position_rate=recipe["caption_position_rate"],
                                    color_rate=recipe["caption_color_rate"])
                 for i in idx.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        z, noise, t, ids = z.to(device), noise.to(device), t.to(device), ids.to(device)
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, text_encoder(ids)[0]).sample
        weights = min_snr_weights(noise_scheduler, t, recipe["min_snr_gamma"])
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weights).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for name, live in (("unet", unet), ("text_encoder", text_encoder)):
                for e, p in zip(ema[name].parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"denoiser step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
        if probe is not None and step > 0 and (step % 500 == 0 or step == steps - 1):
            probe(step, ema["text_encoder"], ema["unet"])
    return ema["text_encoder"].eval(), ema["unet"].eval()


def held_out_prompts(count: int | None = None) -> list[tuple[str, str, str, str]]:
    """(full caption, shape, colour, position) of held-out combinations, in a fixed order; ``count`` limits them."""
    scenes = sorted(world.HELD_OUT, key=lambda s: (s.shape, s.color, s.size, s.position, s.background))
    if count is not None:
        scenes = scenes[:: max(1, len(scenes) // count)][:count]
    return [(world.full_caption(s), s.shape, s.color, s.position) for s in scenes]


def shape_only_accuracy(pipe, judge, per_shape: int, seed: int) -> float:
    """Share of "a photo of a <shape>" samples (no colour named) that the judge reads as that shape."""
    from .benchmark import GENERATION
    from .generate import generate, score

    prompts = [f"a photo of a {shape}" for shape in world.BASE_SHAPES for _ in range(per_shape)]
    expected = [{"shape": shape} for shape in world.BASE_SHAPES for _ in range(per_shape)]
    return score(judge.predict(generate(pipe, prompts, seed, **GENERATION)), expected)["both"]


def pretrain(out_dir: str | Path, seed: int = 0, overrides: dict | None = None, log=print,
             device: str = "cpu") -> dict:
    """Write ``out_dir``/model (diffusers), ``out_dir``/classifier and a quality report; return the report.

    Random draws stay on the CPU whatever ``device`` computes, so a GPU run sees the same data; its
    arithmetic differs, so its weights and scores differ too (the committed ones come from a CPU).
    """
    from .generate import classify_prompts

    recipe = {**TOY_RECIPE, **(overrides or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()
    scenes = [world.random_scene(rng) for _ in range(recipe["images"])]
    images = torch.from_numpy(world.to_array([world.render(s, jitter=rng) for s in scenes]))
    timings["render_s"] = time.time() - t0

    t0 = time.time()
    vae = train_vae(images, recipe, seed, log, device)
    timings["vae_s"] = time.time() - t0

    t0 = time.time()
    judge, judge_acc = train_judge(vae, out, recipe, seed, log, device)
    timings["classifier_s"] = time.time() - t0

    t0 = time.time()
    mean, std = encode_all(vae, images)
    recipe["scaling_factor"] = round(float(1.0 / mean.std()), 5)
    vae.register_to_config(scaling_factor=recipe["scaling_factor"])
    tokenizer = build_tokenizer(recipe["bpe_merges"], seed)

    def probe(step, text_encoder, unet):
        pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet, recipe["scheduler"])
        score = classify_prompts(pipe, judge, held_out_prompts(30), per_prompt=1, seed=seed)
        log(f"  probe at step {step}: held-out shape+colour accuracy {score['both']:.2f} {score}")

    text_encoder, unet = train_denoiser(tokenizer, vae, (mean, std), scenes, recipe, seed, log, probe, device)
    timings["denoiser_s"] = time.time() - t0

    pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet, recipe["scheduler"])
    pipe.to("cpu").save_pretrained(out / "model", safe_serialization=True)
    (out / "model" / "dreamtune_recipe.json").write_text(json.dumps({"seed": seed, **recipe}, indent=2) + "\n")
    report = {"seed": seed, "timings": timings, "classifier_accuracy": judge_acc, "recipe": recipe}
    return write_report(pipe.to(device), judge, report, out, log)


def train_judge(vae, out: Path, recipe: dict, seed: int, log, device: str):
    """Train the classifier on renders and on the VAE's round trips of them; save it under ``out``/classifier."""
    judge = train_classifier(seed, recipe["classifier_steps"], degrade=vae_round_trip(vae, device), log=log,
                             device=device)
    save_classifier(judge, out / "classifier")
    judge_acc = accuracy(judge)
    log(f"classifier accuracy on fresh renders: {judge_acc}")
    return judge, judge_acc


def write_report(pipe, judge, report: dict, out: Path, log) -> dict:
    """Judge the base model (held-out combinations, colourless prompts) into ``out``/pretrain_report.json."""
    from .benchmark import GENERATION
    from .generate import classify_prompts

    seed, recipe = report["seed"], report["recipe"]
    quality = classify_prompts(pipe, judge, held_out_prompts(), per_prompt=recipe["quality_per_prompt"],
                               seed=seed + 1000, **GENERATION)
    shape_only = shape_only_accuracy(pipe, judge, recipe["shape_only_per_shape"], seed=seed + 2000)
    round_trips = round_trip_scores(judge, vae_round_trip(pipe.vae, pipe.device))
    log(f"classifier on VAE round trips of fresh renders: {round_trips}")
    report = {**report, "held_out_quality": quality, "shape_only_accuracy": shape_only,
              "classifier_on_vae_round_trips": round_trips}
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"held-out shape+colour accuracy: {quality['both']:.3f}, position {quality['position']:.3f}; "
        f"shape without a colour named: {shape_only:.3f}")
    return report


def retrain_judge(out_dir: str | Path, log=print, device: str = "cpu") -> dict:
    """Train the classifier again on the VAE pretraining wrote, and judge the base model anew.

    The denoiser draws its own seeds and never reads the judge, so this writes what a full run of
    the current code would (minutes, not the denoiser's 40): for a change to the judge alone.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    saved = json.loads((out / "model" / "dreamtune_recipe.json").read_text())
    seed = saved.pop("seed")
    recipe = {**TOY_RECIPE, **saved}  # a setting the saved recipe lacks takes the current default
    pipe = StableDiffusionPipeline.from_pretrained(
        str(out / "model"), safety_checker=None, requires_safety_checker=False, use_safetensors=True).to(device)
    old = json.loads((out / "pretrain_report.json").read_text())
    started = time.time()
    judge, judge_acc = train_judge(pipe.vae, out, recipe, seed, log, device)
    timings = {**old["timings"], "classifier_s": time.time() - started}
    report = {"seed": seed, "timings": timings, "classifier_accuracy": judge_acc, "recipe": recipe}
    return write_report(pipe, judge, report, out, log)
