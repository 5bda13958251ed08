"""LoRA-family training hooks: PEFT adapters (LoRA, LoCon, DoRA, LoHa, LoKr) on the chosen layers.

The base model stays bitwise as loaded, except with ``lora.init`` pissa/olora, which move the
adapter's start out of the base weights (the exports subtract it back).
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from ...training.method import TrainingMethod
from .dora import add_dora
from .export import LoraExporter
from .family import Initial, check_patterns, conv_targets, initial_adapters, peft_config
from .init_from import load_lora_into
from .settings import LoraSettings


def check_targets(module: torch.nn.Module, targets: list[str], key: str) -> None:
    """Every target must name at least one Linear/Conv module, or the user gets a silent no-op."""
    names = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
        raise ConfigError(f"{key}: {missing} match no layer of the model; layer names include {examples}")


def _names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def _adapted(model: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class LoraMethod(TrainingMethod):
    """Only the adapter weights train."""

    name = "lora"
    exporter_class = LoraExporter

    settings: LoraSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        #: Per model, the PiSSA/OLoRA start ``(A0, B0)`` of each layer, subtracted back on export.
        self.initial: dict[str, Initial] = {}

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
        conv = conv_targets(models.unet) if s.conv_rank else []
        if s.conv_rank and not conv:
            raise ConfigError("lora.conv_rank: this UNet has no 3x3 convolutions in resnets or samplers to adapt")
        self._add(models.unet, "unet", peft_config(s, s.rank, s.alpha, s.target_modules, conv, _names(models.unet)))
        if s.train_text_encoder:
            check_targets(models.text_encoder, s.text_encoder_target_modules, "lora.text_encoder_target_modules")
            self._add(models.text_encoder, "text_encoder",
                      peft_config(s, self.text_encoder_rank, self.text_encoder_alpha, s.text_encoder_target_modules, [],
                                  _names(models.text_encoder)))
        if s.init_from:
            filled = load_lora_into(s.init_from, self.trained_modules(), self.cfg.model.allow_pickle)
            if accelerator.is_main_process:
                print(f"lora.init_from: {filled} modules start from {s.init_from}")
        if s.type == "dora":  # the magnitude starts at the norm of W + s B A as the adapters now stand
            for model in self.trained_modules().values():
                add_dora(model)
        check_patterns(s, [n for part in self.trained_modules().values() for n in _adapted(part)])

    def _add(self, model: torch.nn.Module, part: str, config) -> None:
        model.add_adapter(config)
        if self.settings.init != "gaussian":
            self.initial[part] = initial_adapters(model)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """With LoRA+ (``lora.plus_ratio``), each model's B matrices get their own group at ``ratio x lr``."""
        groups = super().parameter_groups(learning_rate)
        ratio = self.settings.plus_ratio
        if not ratio:
            return groups
        out = []
        for group, (name, module) in zip(groups, self.trained_modules().items()):
            b = {id(p) for n, p in module.named_parameters() if p.requires_grad and ".lora_B." in n}
            out.append({**group, "params": [p for p in group["params"] if id(p) not in b]})
            out.append({**group, "name": f"{name}_lora_B", "lr": group["lr"] * ratio,
                        "params": [p for p in group["params"] if id(p) in b]})
        return out
