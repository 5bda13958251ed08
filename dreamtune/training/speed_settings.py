"""The ``train:`` speed switches (applied in training/speed.py); each leaves the loss the same up to float rounding."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class SpeedSettings(BaseModel):
    """How the math runs, not what it computes: a resume may change any of these."""

    compile: bool = Field(False, description="torch.compile the UNet (slow first steps, faster after).")
    channels_last: bool = Field(False, description="UNet weights and activations in channels_last memory format.")
    allow_tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs; no effect on CPU.")
    attention: Literal["sdpa", "math", "flash", "efficient", "cudnn", "xformers"] = Field(
        "sdpa", description="UNet attention kernel: sdpa lets torch choose; efficient, cudnn, xformers need CUDA.",
    )
    adamw_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="torch AdamW implementation; auto: fused where torch has the kernel (CPU, CUDA).",
    )
