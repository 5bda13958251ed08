"""The ``lora:`` section: the adapter family (LoRA, DoRA, LoHa, LoKr), ranks, alphas, targets and their options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...config import MethodSettings

#: Types whose layers are a product ``B @ A`` (PEFT LoraConfig); the options of LoRA papers apply to these.
LOW_RANK_TYPES = ("lora", "dora")


class LoraSettings(MethodSettings):
    type: Literal["lora", "dora", "loha", "lokr"] = Field(
        "lora", description="lora (LoCon with conv_rank), dora (LoRA with weight decomposition), loha, lokr."
    )
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    conv_rank: int | None = Field(
        None, ge=1,
        description="Also adapt the UNet's 3x3 convolutions (resnets, down/up samplers) at this rank (kohya conv_dim).",
    )
    conv_alpha: float | None = Field(None, gt=0, description="Alpha of the convolution adapters; default conv_rank.")
    init: Literal["gaussian", "pissa", "olora"] = Field(
        "gaussian", description="Start of lora/dora adapters; pissa/olora also change the base weights while training."
    )
    rslora: bool = Field(False, description="Scale alpha/sqrt(rank) instead of alpha/rank (lora/dora).")
    plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices train at this multiple of the learning rate (lora/dora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="loha/lokr: drop rows of the update while training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="loha/lokr: skip a whole adapter for a step.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module ranks: PEFT patterns (module path suffix or regex) -> rank."
    )
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alphas, as rank_pattern.")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1)
    text_encoder_alpha: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0, description="Text-encoder LoRA lr; default train.learning_rate.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    init_from: str | None = Field(
        None, description="Start the adapters from this LoRA file (kohya or diffusers); its rank must match."
    )

    def check_run(self, cfg) -> None:
        if self.init_from and not Path(self.init_from).is_file():
            raise ValueError(f"lora.init_from: {self.init_from} is not a file; give a kohya or diffusers LoRA "
                             ".safetensors")

    @model_validator(mode="after")
    def _check(self) -> "LoraSettings":
        low_rank_only = {"lora.init": self.init != "gaussian", "lora.rslora": self.rslora,
                         "lora.plus_ratio": self.plus_ratio is not None, "lora.dropout": self.dropout > 0,
                         "lora.init_from": self.init_from is not None}
        for key, used in low_rank_only.items():
            if used and self.type not in LOW_RANK_TYPES:
                raise ValueError(f"{key} applies to lora.type lora or dora, not {self.type}; "
                                 "remove it or change lora.type")
        for key, value in (("lora.rank_dropout", self.rank_dropout), ("lora.module_dropout", self.module_dropout)):
            if value and self.type in LOW_RANK_TYPES:
                raise ValueError(f"{key} applies to lora.type loha or lokr (for lora/dora use lora.dropout)")
        if self.init != "gaussian" and self.init_from:
            raise ValueError(f"lora.init={self.init} and lora.init_from both set where the adapters start; keep one")
        if self.init != "gaussian" and self.conv_rank is not None:
            raise ValueError(f"lora.init={self.init} initialises linear layers only (PEFT); remove lora.conv_rank "
                             "or use lora.init=gaussian")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("lora.conv_alpha needs lora.conv_rank (the rank of the convolution adapters)")
        bad = [k for k, v in self.rank_pattern.items() if int(v) < 1]
        if bad:
            raise ValueError(f"lora.rank_pattern: ranks must be >= 1 ({bad[0]!r})")
        return self

    def skips_modules(self) -> bool:
        return self.module_dropout > 0

    def trained_models(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.train_text_encoder else ("unet",)

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        if self.train_text_encoder:
            return "lora.train_text_encoder=true trains it", "lora.train_text_encoder"
        return None

    def card_settings(self) -> str:
        parts = [f"{self.type}, rank {self.rank}, alpha {self.alpha}"]
        if self.conv_rank:
            parts.append(f"conv rank {self.conv_rank}, conv alpha {self.conv_alpha or self.conv_rank}")
        if self.init != "gaussian":
            parts.append(f"{self.init} init")
        if self.rslora:
            parts.append("rsLoRA scaling")
        if self.plus_ratio:
            parts.append(f"LoRA+ ratio {self.plus_ratio}")
        return ", ".join(parts) + f", targets {', '.join(self.target_modules)}"
