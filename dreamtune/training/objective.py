"""The diffusion training objective: noise, timesteps, prediction target and min-SNR weights.

Randomness is drawn per sample from a generator keyed by the sample's place in the global batch,
so the same global batch gets the same noise whether it runs on one process or several, and a
resumed run draws exactly what a straight run would.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from ..errors import ConfigError


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
    """The VAE's scaled latent distribution [B, 2, C, h, w] (mean, std): what the latent cache stores."""
    dist, scale = vae.encode(pixels).latent_dist, vae.config.scaling_factor
    return torch.stack([dist.mean * scale, dist.std * scale], dim=1)


def sample_latents(moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw from the latent Gaussian ``moments`` with the per-sample generators (cached or not: same draw)."""
    mean, std = moments.unbind(1)
    eps = [torch.randn(mean.shape[1:], generator=g) for g in generators]
    return mean + std * _stack(eps, mean)


def sample_noise(latents: torch.Tensor, noise_offset: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Gaussian noise like ``latents``; a per-channel offset teaches very dark and very bright images."""
    noise = _stack([torch.randn(latents.shape[1:], generator=g) for g in generators], latents)
    if noise_offset:
        offsets = [torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators]
        noise = noise + noise_offset * _stack(offsets, latents)
    return noise


def sample_timesteps(scheduler, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform training timesteps over the scheduler's range, one per sample."""
    high = scheduler.config.num_train_timesteps
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generators]).to(device).long()


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
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32 whatever the autocast dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
