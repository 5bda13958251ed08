"""Which dtype each model trains and runs in: train.mixed_precision, train.full_bf16 and model.vae_dtype."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..models.dtypes import dtype_of


def module_dtypes(cfg: RunConfig, names: list[str], trained: set[str]) -> dict[str, torch.dtype]:
    """Name -> dtype for each model in ``names``: frozen ones in the mixed-precision dtype (fp32 for "no"), the
    VAE in fp32 when model.vae_dtype says so, trained ones in fp32 (bf16 with train.full_bf16)."""
    weight_dtype = dtype_of(cfg.train.mixed_precision)
    trained_dtype = torch.bfloat16 if cfg.train.full_bf16 else torch.float32
    dtypes = {name: trained_dtype if name in trained else weight_dtype for name in names}
    if "vae" in dtypes and cfg.model.vae_dtype is not None:
        dtypes["vae"] = dtype_of(cfg.model.vae_dtype)
    return dtypes


def place_models(cfg: RunConfig, components: dict, trained: dict[str, torch.nn.Module], device) -> torch.dtype:
    """Move every model to ``device`` in its dtype (one compute dtype, whatever the base was stored in: many
    local copies are fp16); returns the frozen models' dtype, the one latents and embeddings are cast to."""
    from diffusers.training_utils import cast_training_params

    modules = {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}
    for name, dtype in module_dtypes(cfg, list(modules), set(trained)).items():
        modules[name].to(device, dtype=dtype)
    if not cfg.train.full_bf16:
        for module in trained.values():
            # Trainable weights stay fp32 so fp16 mixed precision can unscale their gradients.
            cast_training_params(module, dtype=torch.float32)
    return dtype_of(cfg.train.mixed_precision)
