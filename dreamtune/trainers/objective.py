"""The diffusion training objective: noise, timesteps, prediction target and min-SNR weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise like ``latents``; a per-channel offset teaches very dark and very bright images."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
        )
    return noise


def sample_timesteps(scheduler, batch_size: int, device: torch.device) -> torch.Tensor:
    """Uniform training timesteps over the scheduler's range."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device).long()


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon or v_prediction (model.prediction_type)")


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
