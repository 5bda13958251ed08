"""The speed switches of the `train:` section: TF32, attention kernel, channels_last, torch.compile.

Each one changes how the UNet's math runs, never what it computes beyond floating-point rounding, so none
of them is a training hook: the loop calls ``apply_speed_settings`` once, after the models are on their
device and before accelerate wraps them.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

# train.attention -> torch's SDPA backend; "sdpa" leaves the choice to torch.
_SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "cudnn": "CUDNN_ATTENTION"}
_CUDA_ONLY = {"efficient", "cudnn", "xformers"}


def set_tf32(allow: bool) -> None:
    """train.allow_tf32: TF32 matmuls and convolutions on Ampere and later (10 mantissa bits, ~2x fp32 speed)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


class KernelAttnProcessor:
    """diffusers' SDPA attention with torch's kernel pinned to one backend (train.attention)."""

    def __init__(self, backend: str):
        from diffusers.models.attention_processor import AttnProcessor2_0
        from torch.nn.attention import SDPBackend

        self.backend = getattr(SDPBackend, _SDPA_BACKENDS[backend])
        self._inner = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return self._inner(*args, **kwargs)


def set_attention(unet, attention: str, device: torch.device) -> None:
    """train.attention: which kernel computes the UNet's attention (the text encoder keeps its own)."""
    if attention in _CUDA_ONLY and device.type != "cuda":
        raise ConfigError(f"train.attention={attention} needs a CUDA device (this run is on {device.type}); "
                          "use train.attention=sdpa, math or flash")
    if attention == "sdpa":
        return  # diffusers' default processors already call torch's SDPA, which picks the kernel
    if attention == "xformers":
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ConfigError("train.attention=xformers needs the xformers package (pip install xformers "
                              "matching your torch), or use train.attention=sdpa")
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(KernelAttnProcessor(attention))


def apply_speed_settings(train_cfg, unet: torch.nn.Module, device: torch.device) -> None:
    """Apply train.allow_tf32, train.attention, train.channels_last and train.compile to the UNet in place.

    ``Module.compile`` (not ``torch.compile(module)``) keeps the module and its state-dict keys, so
    checkpoints, exports and accelerate's wrapping see the same UNet as without it.
    """
    set_tf32(train_cfg.allow_tf32)
    set_attention(unet, train_cfg.attention, device)
    if train_cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if train_cfg.compile:
        unet.compile()
