"""The ``dreambooth:`` section: text-encoder training, EMA, prior preservation and class images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...config import MethodSettings


class DreamBoothSettings(MethodSettings):
    exports_full_model = True

    train_text_encoder: bool = Field(False, description="Also fine-tune the whole text encoder.")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="With train_text_encoder: its lr; default train.learning_rate."
    )
    text_encoder_steps: int | None = Field(
        None, ge=1, description="With train_text_encoder: freeze it after this many steps; null trains it to the end."
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the trained weights (EMAModel).")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="Per-step EMA decay, the ceiling of the warmup ramp.")
    ema_power: float | None = Field(
        0.75, gt=0, description="EMA warmup: decay = 1 - (1 + step)^-power up to ema_decay (3/4 suits runs under "
        "~100k steps, 2/3 longer ones); null uses diffusers' (1 + step) / (10 + step) ramp.",
    )
    ema_update_after_step: int = Field(0, ge=0, description="The EMA copies the weights until this step, then averages.")
    ema_update_every: int = Field(
        1, ge=1, description="Average every N steps (decay compounded to match per-step averaging)."
    )
    ema_on_cpu: bool = Field(
        False, description="Keep the EMA in CPU memory between updates: less GPU memory, two transfers per update."
    )
    use_ema_for: Literal["ema", "raw", "both"] = Field(
        "ema", description="Weights to validate and export with; 'both' validates with the EMA and exports "
        "<name>.safetensors (EMA) and <name>-raw.safetensors.",
    )
    prior_preservation: bool = Field(False, description="Train on generated class images too (prior loss).")
    class_prompt: str | None = Field(None, description="Prompt of the subject's class, e.g. 'a photo of dog'.")
    class_dir: str | None = Field(
        None, description="Class images (real or generated; missing ones are generated). Default <output.dir>/class_images."
    )
    num_class_images: int = Field(200, ge=1, description="Class images to train with (generated if missing).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss (lambda).")
    class_generation_batch_size: int = Field(4, ge=1, description="Class images generated per pipeline call.")
    class_generation_steps: int = Field(30, ge=1, description="Sampling steps per generated class image.")

    @model_validator(mode="after")
    def _check(self) -> "DreamBoothSettings":
        if self.prior_preservation and not self.class_prompt:
            raise ValueError(
                "dreambooth.prior_preservation=true needs dreambooth.class_prompt: set it to the subject's class "
                "without the identifier, e.g. 'a photo of dog'"
            )
        if self.use_ema_for == "both" and not self.ema:
            raise ValueError("dreambooth.use_ema_for=both needs dreambooth.ema=true; or set use_ema_for: raw")
        return self


    def apply_run_defaults(self, cfg) -> None:
        """Class images default to a folder inside the run."""
        if self.class_dir is None:
            self.class_dir = str(Path(cfg.output.dir) / "class_images")

    def trained_models(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.train_text_encoder else ("unet",)

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        if self.train_text_encoder:
            return "dreambooth.train_text_encoder=true trains it", "dreambooth.train_text_encoder"
        return None

    def card_settings(self) -> str:
        parts = ["text encoder trained" if self.train_text_encoder else "text encoder frozen"]
        if self.ema:
            parts.append(f"EMA {self.ema_decay} (weights used: {self.use_ema_for})")
        if self.prior_preservation:
            parts.append(f"prior preservation ({self.class_prompt!r}, weight {self.prior_loss_weight})")
        return ", ".join(parts)
