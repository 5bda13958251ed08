"""LoRA: low-rank adapters on the UNet (and optionally the text encoder) through PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..weights.lora_formats import kohya_metadata, peft_to_kohya, save_diffusers_lora
from ..weights.safetensors_io import save_safetensors
from .config import LoraSettings, RunConfig
from .method import TrainingMethod
from .models import BaseModel


def _lora_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )


class LoraMethod(TrainingMethod):
    """Only the adapter weights train; the base model stays bitwise as loaded."""

    name = "lora"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.settings: LoraSettings = cfg.lora or LoraSettings()

    @property
    def text_encoder_rank(self) -> int:
        return self.settings.text_encoder_rank or self.settings.rank

    @property
    def text_encoder_alpha(self) -> float:
        return self.settings.text_encoder_alpha or self.settings.alpha

    def setup(self, models: BaseModel) -> None:
        super().setup(models)
        s = self.settings
        self._check_targets(models.unet, s.target_modules, "lora.target_modules")
        models.unet.add_adapter(_lora_config(s.rank, s.alpha, s.dropout, s.target_modules))
        if s.train_text_encoder:
            self._check_targets(models.text_encoder, s.text_encoder_target_modules, "lora.text_encoder_target_modules")
            models.text_encoder.add_adapter(
                _lora_config(self.text_encoder_rank, self.text_encoder_alpha, s.dropout, s.text_encoder_target_modules)
            )

    @staticmethod
    def _check_targets(module: torch.nn.Module, targets: list[str], key: str) -> None:
        """Every target must name at least one Linear/Conv module, or the user gets a silent no-op."""
        names = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            examples = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
            raise ValueError(f"{key}: {missing} match no layer of the model; layer names include {examples}")

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        assert self.models is not None
        modules = {"unet": self.models.unet}
        if self.settings.train_text_encoder:
            modules["text_encoder"] = self.models.text_encoder
        return modules

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        assert self.models is not None
        groups = [{"params": [p for p in self.models.unet.parameters() if p.requires_grad], "lr": learning_rate}]
        if self.settings.train_text_encoder:
            te_params = [p for p in self.models.text_encoder.parameters() if p.requires_grad]
            groups.append({"params": te_params, "lr": self.settings.text_encoder_lr or learning_rate})
        return groups

    def save(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        from peft.utils import get_peft_model_state_dict

        s = self.settings
        unet_lora = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(modules["unet"]).items()}
        te_lora = None
        if "text_encoder" in modules:
            te_state = get_peft_model_state_dict(modules["text_encoder"])
            te_lora = {k: v.detach().float().cpu() for k, v in te_state.items()}
        final_dir.mkdir(parents=True, exist_ok=True)
        metadata = kohya_metadata(
            rank=s.rank,
            alpha=s.alpha,
            steps=step,
            seed=self.cfg.train.seed,
            base_model=self.cfg.model.pretrained,
            output_name=self.cfg.output.name,
            resolution=self.cfg.data.resolution,
            trigger=self.trigger(),
            train_text_encoder=s.train_text_encoder,
        )
        diffusers_path = save_diffusers_lora(
            final_dir,
            unet_lora,
            te_lora,
            unet_lora_config=modules["unet"].peft_config["default"].to_dict(),
            te_lora_config=modules["text_encoder"].peft_config["default"].to_dict() if te_lora else None,
            metadata=metadata,
        )
        alphas = {"unet": s.alpha, "text_encoder": self.text_encoder_alpha}
        ranks = {"unet": s.rank, "text_encoder": self.text_encoder_rank}
        kohya = peft_to_kohya(unet_lora, te_lora, rank=ranks, alpha=alphas)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.export.dtype]
        kohya = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kohya.items()}
        kohya_path = final_dir / f"{self.cfg.output.name}.safetensors"
        save_safetensors(kohya, kohya_path, metadata=metadata)
        return [Path(diffusers_path), kohya_path]
