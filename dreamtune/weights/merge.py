"""The plain-LoRA part of baking adapters into an SD 1.x checkpoint: the update of one module, and where it goes.

For a module with ``down`` (lora_A, ``[r, in]`` or conv ``[r, in, kh, kw]``), ``up`` (lora_B,
``[out, r]`` or conv ``[out, r, 1, 1]``), file scale ``alpha / r`` and user scale ``s``:
``W += s * alpha / r * up @ down`` (for convs, the composition of the two convolutions,
``einsum('or,rihw->oihw')``). lycoris_merge.merge_adapters applies it, and the other types, tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import WeightsError
from .ldm_keys import TEXT_MODEL_PREFIX, KeyMap, component_of
from .lora_keys import canonical_text_encoder_path
from .sources import TensorSource


class MergeError(WeightsError):
    """A LoRA that does not fit the checkpoint it is merged into."""


def lora_delta(down: torch.Tensor, up: torch.Tensor, target_shape: tuple[int, ...], key: str) -> torch.Tensor:
    """``up @ down`` (linear) or the conv composition, in fp32, shaped like the target weight."""
    d, u = down.float(), up.float()
    if u.ndim == 4:
        if tuple(u.shape[2:]) != (1, 1):
            raise MergeError(f"{key}: LoRA up weight {tuple(u.shape)} is not a 1x1 conv (kohya conv LoRA)")
        u = u.flatten(1)
    if d.ndim == 4:
        delta = torch.einsum("or,rihw->oihw", u, d)
    elif d.ndim == 2 and u.ndim == 2:
        delta = u @ d
    else:
        raise MergeError(f"{key}: unsupported LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
    if tuple(delta.shape) != tuple(target_shape):
        if delta.numel() != torch.Size(target_shape).numel() or delta.shape[:2] != torch.Size(target_shape[:2]):
            raise MergeError(
                f"LoRA for key {key!r} makes a {tuple(delta.shape)} update but the checkpoint weight is "
                f"{tuple(target_shape)}: is the LoRA for another model?"
            )
        delta = delta.reshape(target_shape)
    return delta


def target_key(part: str, module: str, unet_map: KeyMap) -> str:
    """Canonical single-file weight key of a LoRA module."""
    if part == "text_encoder":
        return TEXT_MODEL_PREFIX + canonical_text_encoder_path(module) + ".weight"
    diffusers_key = module + ".weight"
    if diffusers_key not in unet_map.to_single:
        raise MergeError(f"LoRA UNet module {module!r} is not a weight of this checkpoint's UNet")
    return unet_map.to_single[diffusers_key]


def text_encoder_module_names(base: TensorSource) -> list[str]:
    """Module paths (transformers-5 naming) of the base's text-encoder weights."""
    return sorted({k[len(TEXT_MODEL_PREFIX):].rsplit(".", 1)[0] for k in base.keys
                   if component_of(k) == "text_encoder" and k.startswith(TEXT_MODEL_PREFIX)})


def unet_module_names(unet_map: KeyMap) -> list[str]:
    """Module paths of a UNet from its key map."""
    return sorted({k.rsplit(".", 1)[0] for k in unet_map.to_single})


def describe_loras(paths: Sequence[Path], scales: Sequence[float]) -> list[dict[str, object]]:
    """Settings entry for metadata: file name and scale of each merged LoRA."""
    return [{"file": Path(p).name, "scale": s} for p, s in zip(paths, scales)]
