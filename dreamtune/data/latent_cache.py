"""VAE latent distributions computed once per (VAE, image, size, crop, flip), kept in memory or on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


#: Part of every cache key: bump it when what the cache stores changes, so old entries are never read.
#: v2 stores the distribution (mean and std, [2, C, h, w]); v1 stored only the mean.
CACHE_LAYOUT = "moments-v2"


@dataclass(frozen=True)
class LatentEncoder:
    """Pixels [B, 3, H, W] in [-1, 1] -> the scaled latent distribution [B, 2, C, h, w] (mean, std); which VAE."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    fingerprint: str
    batch_size: int = 8


def module_fingerprint(module: torch.nn.Module, config: Any = None, samples: int = 4) -> str:
    """A short hash of a model's config and a few of its weight tensors (changed weights -> new hash)."""
    digest = hashlib.sha256(json.dumps(dict(config or {}), sort_keys=True, default=str).encode())
    tensors = list(module.state_dict().items())
    picks = {0, len(tensors) - 1, *range(0, len(tensors), max(1, len(tensors) // samples))}
    for i in sorted(p for p in picks if 0 <= p < len(tensors)):
        name, tensor = tensors[i]
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(str(sum(t.numel() for _, t in tensors)).encode())
    return digest.hexdigest()[:16]


def latent_key(fingerprint: str, identity: str, target: tuple[int, int], transform_key: str) -> str:
    """The cache key: layout, VAE, image content, training size and the exact crop/flip."""
    text = f"{CACHE_LAYOUT}|{fingerprint}|{identity}|{target[0]}x{target[1]}|{transform_key}"
    return hashlib.sha256(text.encode()).hexdigest()


class LatentCache:
    """A key -> latent moments ([2, C, h, w]: mean, std) store: a dict in memory, or one safetensors file per key."""

    def __init__(self, mode: str, folder: str | Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"data.cache_latents: {mode!r} is not memory or disk")
        if mode == "disk" and folder is None:
            raise ValueError("data.cache_latents=disk needs a folder (data.cache_dir)")
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.computed = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self.memory if self.mode == "memory" else self._path(key).is_file()

    def get(self, key: str) -> torch.Tensor:
        """The stored moments for ``key``; KeyError when absent."""
        if self.mode == "memory":
            return self.memory[key]
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return load_file(str(path))["moments"]

    def put(self, key: str, moments: torch.Tensor) -> None:
        """Store ``moments`` (on the CPU; disk writes are atomic, safe with several processes)."""
        moments = moments.detach().to("cpu", torch.float32).contiguous()
        self.computed += 1
        if self.mode == "memory":
            self.memory[key] = moments
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"moments": moments}, str(tmp))
        os.replace(tmp, path)
