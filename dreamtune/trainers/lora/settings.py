"""The ``lora:`` section: adapter rank, alpha, targets, and the text encoder's own adapter."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ...config import MethodSettings


class LoraSettings(MethodSettings):
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
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

    def trained_models(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.train_text_encoder else ("unet",)

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        if self.train_text_encoder:
            return "lora.train_text_encoder=true trains it", "lora.train_text_encoder"
        return None

    def card_settings(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha}, targets {', '.join(self.target_modules)}"
