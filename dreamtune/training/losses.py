"""Per-element losses, their timestep-dependent thresholds, per-sample weights and masked reduction.

Formulas follow kohya sd-scripts (``conditional_loss``, ``get_huber_threshold_if_needed``,
``apply_debiased_estimation``) so a kohya user's settings mean the same here. Everything is fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar) per timestep, in fp32 on the timesteps' device."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps).float()


def huber_threshold(scheduler, timesteps: torch.Tensor, schedule: str, c: float) -> torch.Tensor:
    """The Huber threshold per sample: constant c; exponential c^(t/T); snr (1-c)/(1+sigma_t)^2 + c."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c)
    if schedule == "exponential":
        return torch.exp(math.log(c) * t / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    raise ValueError(f"train.huber_schedule: {schedule!r} is not constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, fp32: l2, l1, huber 2c(sqrt(d^2+c^2)-c) or smooth_l1 2(sqrt(d^2+c^2)-c).

    ``c`` is one threshold per sample (huber and smooth_l1 only).
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.float().view(-1, *[1] * (pred.dim() - 1))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    if loss_type == "smooth_l1":
        return smooth
    if loss_type == "huber":
        return c * smooth
    raise ValueError(f"train.loss_type: {loss_type!r} is not l2, l1, huber or smooth_l1")


def debiased_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, kohya): 1/sqrt(snr) for epsilon, 1/(snr+1) for v; snr clamped at 1000.

    The lower clamp keeps a zero-terminal-SNR timestep finite (only v-prediction reaches snr 0 here).
    """
    s = snr(scheduler, timesteps).clamp(min=1e-8, max=1000)
    if scheduler.config.prediction_type == "v_prediction":
        return 1 / (s + 1)
    return 1 / torch.sqrt(s)


def loss_weights(mask: torch.Tensor, size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Masks [B, 1, H, W] in [0, 1] -> weights [B, 1, h, w]: area-downsampled, background weighted ``unmasked_weight``."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="area")
    return mask + unmasked_weight * (1 - mask)


def reduce_per_sample(loss: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over each sample's elements; with weights, sum(w * loss) / sum(w) (0 where the weights sum to 0)."""
    if weights is None:
        return loss.flatten(1).mean(dim=1)
    weights = weights.expand_as(loss)
    total = weights.flatten(1).sum(dim=1)
    return (weights * loss).flatten(1).sum(dim=1) / total.clamp(min=1e-12)
