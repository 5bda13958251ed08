"""The diffusion training objective: noise, timesteps, prediction target, loss and its per-sample weights.

Randomness is drawn per sample from a generator keyed by the sample's place in the global batch,
so the same global batch gets the same noise whether it runs on one process or several, and a
resumed run draws exactly what a straight run would.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.pipeline import with_zero_terminal_snr
from .losses import debiased_weights, elementwise_loss, huber_threshold, loss_weights, reduce_per_sample, snr


def sample_generators(seed: int, micro_step: int, positions: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from a hash of (run seed, step counter, place in the batch).

    A hash, not arithmetic, so no batch size, process count or seed makes two samples share a stream.
    """
    return [torch.Generator().manual_seed(int.from_bytes(
        hashlib.blake2b(f"{seed}:{micro_step}:{p}".encode(), digest_size=8).digest(), "little"))
        for p in positions]


def _stack(draws: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def latent_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's scaled latent distribution [B, 2, C, h, w] (mean, std): what the latent cache stores.

    ``pixels`` are cast to the VAE's dtype (model.vae_dtype may keep it fp32 under mixed precision)."""
    dist, scale = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist, vae.config.scaling_factor
    return torch.stack([dist.mean * scale, dist.std * scale], dim=1)


def sample_latents(moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw from the latent Gaussian ``moments`` with the per-sample generators (cached or not: same draw)."""
    mean, std = moments.unbind(1)
    eps = [torch.randn(mean.shape[1:], generator=g) for g in generators]
    return mean + std * _stack(eps, mean)


def sample_noise(latents: torch.Tensor, noise_offset: float, generators: list[torch.Generator],
                 random_strength: bool = False) -> torch.Tensor:
    """Gaussian noise like ``latents``; a per-channel offset teaches very dark and very bright images.

    ``random_strength`` scales each sample's offset by a uniform draw in [0, 1) (kohya's noise_offset_random_strength).
    """
    noise = _stack([torch.randn(latents.shape[1:], generator=g) for g in generators], latents)
    if noise_offset:
        offsets = [torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators]
        if random_strength:
            offsets = [offset * torch.rand(1, generator=g) for offset, g in zip(offsets, generators)]
        noise = noise + noise_offset * _stack(offsets, latents)
    return noise


def pyramid_noise(noise: torch.Tensor, generators: list[torch.Generator], iterations: int,
                  discount: float) -> torch.Tensor:
    """Multi-resolution noise (kohya's pyramid_noise_like): Gaussian noise at sizes shrinking by a random factor
    in [2, 4) per level, bilinearly upsampled and added with weight discount^level, rescaled to unit std.

    Each sample is rescaled by its own std (kohya: the batch's), so a sample's noise never depends on its batch.
    """
    channels, height, width = noise.shape[1:]
    out = []
    for sample, g in zip(noise.float().cpu(), generators):
        for level in range(iterations):
            r = torch.rand(1, generator=g).item() * 2 + 2
            h, w = max(1, int(height / r**level)), max(1, int(width / r**level))
            low = torch.randn(1, channels, h, w, generator=g)
            sample = sample + F.interpolate(low, size=(height, width), mode="bilinear")[0] * discount**level
            if h == 1 or w == 1:
                break
        out.append(sample / sample.std())
    return _stack(out, noise)


def perturbed_noise(noise: torch.Tensor, strength: float, generators: list[torch.Generator]) -> torch.Tensor:
    """The noise that goes into the noisy input with input perturbation: noise + strength * fresh Gaussian noise."""
    extra = _stack([torch.randn(noise.shape[1:], generator=g) for g in generators], noise)
    return noise + strength * extra


def sample_timesteps(scheduler, generators: list[torch.Generator], device: torch.device,
                     low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform training timesteps in [low, high) (default: the scheduler's whole range), one per sample."""
    high = scheduler.config.num_train_timesteps if high is None else high
    return torch.cat([torch.randint(low, high, (1,), generator=g) for g in generators]).to(device).long()


def training_scheduler(scheduler, zero_terminal_snr: bool):
    """The noise scheduler to train with: ``scheduler``, or its zero-terminal-SNR rescaling (Lin et al. 2024).

    The rescaled betas make the last timestep pure noise; sampling then needs trailing timestep spacing, which
    the returned config carries to every scheduler built from it (validation images, exports).
    """
    if not zero_terminal_snr:
        return scheduler
    if scheduler.config.prediction_type != "v_prediction":
        raise ConfigError(
            "train.zero_terminal_snr=true needs a v-prediction model: at the last timestep the input is pure noise, "
            "so an epsilon model learns nothing there and samples from it come out grey. Set "
            "model.prediction_type=v_prediction (and train long enough to convert the model), or "
            "train.zero_terminal_snr=false")
    return with_zero_terminal_snr(scheduler)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"unsupported prediction_type {kind!r}; use epsilon or v_prediction (model.prediction_type)")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights (Hang et al. 2023).

    epsilon: min(snr, g) / snr; v-prediction: min(snr, g) / (snr + 1), since the v loss already
    carries a factor (snr + 1) relative to the x0 loss.
    """
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio.clamp(min=1e-8)


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     threshold: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample in fp32 whatever the autocast dtype: ``loss_type`` per element (``threshold`` per sample
    for huber/smooth_l1), averaged, or with ``weights`` the weighted mean sum(w * loss) / sum(w)."""
    return reduce_per_sample(elementwise_loss(pred, target, loss_type, threshold), weights)


class Objective:
    """The run's objective: draws latents, noise and timesteps per sample, predicts, and returns each sample's loss.

    Built once from the train section; training and the held-out validation loss both call ``losses``.
    """

    def __init__(self, scheduler, train, unmasked_weight: float = 1.0):
        self.scheduler, self.t, self.unmasked_weight = scheduler, train, unmasked_weight
        steps = scheduler.config.num_train_timesteps
        if (train.max_timestep or 0) > steps or train.min_timestep >= steps:
            raise ConfigError(
                f"train.min_timestep ({train.min_timestep}) and train.max_timestep ({train.max_timestep}) must lie "
                f"within the model's {steps} training timesteps: 0 <= min_timestep < max_timestep <= {steps}")

    def losses(self, unet, moments: torch.Tensor, hidden: torch.Tensor, generators: list[torch.Generator],
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample losses, weighted (min-SNR, debiased); ``mask`` [B, 1, H, W] weights where each sample counts."""
        s, t = self.scheduler, self.t
        latents = sample_latents(moments, generators)
        noise = sample_noise(latents, t.noise_offset, generators, t.noise_offset_random_strength)
        if t.multires_noise_iterations:
            noise = pyramid_noise(noise, generators, t.multires_noise_iterations, t.multires_noise_discount)
        timesteps = sample_timesteps(s, generators, latents.device, t.min_timestep, t.max_timestep)
        noised_with = perturbed_noise(noise, t.input_perturbation, generators) if t.input_perturbation else noise
        pred = unet(s.add_noise(latents, noised_with, timesteps), timesteps, hidden, return_dict=False)[0]
        threshold = None
        if t.loss_type in ("huber", "smooth_l1"):
            threshold = huber_threshold(s, timesteps, t.huber_schedule, t.huber_c)
        weights = None
        if mask is not None:
            weights = loss_weights(mask.to(latents.device), latents.shape[-2:], self.unmasked_weight)
        target = prediction_target(s, latents, noise, timesteps)
        losses = per_sample_error(pred, target, t.loss_type, threshold, weights)
        # Weights per sample, before any method splits the batch (e.g. instance vs prior).
        if t.snr_gamma:
            losses = losses * min_snr_weights(s, timesteps, t.snr_gamma)
        if t.debiased_estimation:
            losses = losses * debiased_weights(s, timesteps)
        return losses
