"""Optimizer and learning-rate schedule from the `train:` section."""

from __future__ import annotations

from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~75% less optimizer memory)."""
    kwargs = dict(
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as err:  # bitsandbytes raises several kinds when its native library is missing
            raise ConfigError(
                f"train.optimizer=adamw8bit needs a working bitsandbytes ({type(err).__name__}: {err}); "
                "install it for your CUDA version or use train.optimizer=adamw"
            ) from err
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.adamw_impl == "auto":
        try:  # one kernel for every tensor's update (measured 11% of a tiny full fine-tune's CPU step)
            return torch.optim.AdamW(groups, **kwargs, fused=True)
        except RuntimeError:  # no fused kernel for these parameters' device
            return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **adamw_impl_kwargs(cfg))


def adamw_impl_kwargs(cfg: TrainConfig) -> dict[str, bool]:
    """train.adamw_impl as torch.optim.AdamW's ``fused``/``foreach`` flags (auto: fused where torch has it)."""
    if cfg.adamw_impl != "auto" and cfg.optimizer != "adamw":
        raise ConfigError(f"train.adamw_impl={cfg.adamw_impl} applies to train.optimizer=adamw only "
                          f"(this run uses {cfg.optimizer}); set train.adamw_impl=auto")
    return {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}[cfg.adamw_impl]


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, num_processes: int):
    """diffusers' schedules; counts are per process because accelerate steps the schedule on each."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=cfg.max_steps * num_processes,
    )
