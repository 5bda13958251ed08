"""The frozen encoders run once ahead of training: data.cache_latents and data.cache_text_embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .objective import latent_moments


def latent_encoder(data_cfg, vae, device):
    """The VAE as data.cache_latents' encoder (its scaled latent mean and std), or None when not caching."""
    if data_cfg.cache_latents == "none":
        return None
    from ..data.latent_cache import LatentEncoder, module_fingerprint

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return latent_moments(vae, pixels.to(device))

    return LatentEncoder(encode, module_fingerprint(vae, {**vae.config, "dtype": str(vae.dtype)}))


def text_cache(data_cfg, encode: Callable[[list[str]], torch.Tensor], loader):
    """data.cache_text_embeddings: each distinct caption through the frozen text encoder once, or None."""
    if not data_cfg.cache_text_embeddings:
        return None
    from ..data.text_cache import TextEmbeddingCache

    return TextEmbeddingCache(encode, sorted(loader.captions()))
