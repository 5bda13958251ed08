"""LoRA training hooks: PEFT adapters on the chosen layers; the base model stays bitwise as loaded."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...training.method import TrainingMethod
from .export import LoraExporter
from .init_from import load_lora_into
from .settings import LoraSettings


def _lora_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )


def check_targets(module: torch.nn.Module, targets: list[str], key: str) -> None:
    """Every target must name at least one Linear/Conv module, or the user gets a silent no-op."""
    names = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
        raise ConfigError(f"{key}: {missing} match no layer of the model; layer names include {examples}")


class LoraMethod(TrainingMethod):
    """Only the adapter weights train."""

    name = "lora"
    exporter_class = LoraExporter

    settings: LoraSettings

    @property
    def text_encoder_rank(self) -> int:
        return self.settings.text_encoder_rank or self.settings.rank

    @property
    def text_encoder_alpha(self) -> float:
        return self.settings.text_encoder_alpha or self.settings.alpha

    def setup(self, models, accelerator) -> None:
        super().setup(models, accelerator)
        s = self.settings
        check_targets(models.unet, s.target_modules, "lora.target_modules")
        models.unet.add_adapter(_lora_config(s.rank, s.alpha, s.dropout, s.target_modules))
        if s.train_text_encoder:
            check_targets(models.text_encoder, s.text_encoder_target_modules, "lora.text_encoder_target_modules")
            models.text_encoder.add_adapter(
                _lora_config(self.text_encoder_rank, self.text_encoder_alpha, s.dropout, s.text_encoder_target_modules)
            )
        if s.init_from:
            filled = load_lora_into(s.init_from, self.trained_modules(), self.cfg.model.allow_pickle)
            if accelerator.is_main_process:
                print(f"lora.init_from: {filled} modules start from {s.init_from}")
