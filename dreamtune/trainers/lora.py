"""LoRA: low-rank adapters on the UNet (and optionally the text encoder) through PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..weights.lora_formats import kohya_metadata, lora_config_values, peft_to_kohya, save_diffusers_lora
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
        return self.unet_and_text_encoder(self.settings.train_text_encoder)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        assert self.models is not None
        unet_params = [p for p in self.models.unet.parameters() if p.requires_grad]
        groups = [{"name": "unet", "params": unet_params, "lr": learning_rate}]
        if self.settings.train_text_encoder:
            te_params = [p for p in self.models.text_encoder.parameters() if p.requires_grad]
            groups.append({"name": "text_encoder", "params": te_params, "lr": self.settings.text_encoder_lr or learning_rate})
        return groups

    def save(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        lora = {"unet": self._lora_state(modules["unet"])}
        if "text_encoder" in modules:
            lora["text_encoder"] = self._lora_state(modules["text_encoder"])
        configs = {part: modules[part].peft_config["default"] for part in lora}
        ranks, alphas = {}, {}
        for part, state in lora.items():
            part_ranks, part_alphas = lora_config_values(state, configs[part])
            ranks.update(part_ranks)
            alphas.update(part_alphas)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.export.dtype]
        kohya = peft_to_kohya(lora["unet"], lora.get("text_encoder"), rank=ranks, alpha=alphas)
        kohya = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kohya.items()}
        s, t = self.settings, self.cfg.train
        metadata = kohya_metadata(
            rank=s.rank,
            alpha=s.alpha,
            title=self.cfg.output.name,
            output_name=self.cfg.output.name,
            steps=step,
            seed=t.seed,
            resolution=self.cfg.data.resolution,
            trigger_phrase=self.trigger(),
            base_model=self.cfg.model.pretrained,
            learning_rate=t.learning_rate,
            unet_lr=t.learning_rate,
            text_encoder_lr=(s.text_encoder_lr or t.learning_rate) if s.train_text_encoder else None,
            training_comment="trained with dreamtune",
            tensors=kohya,
        )
        final_dir.mkdir(parents=True, exist_ok=True)
        diffusers_path = save_diffusers_lora(
            final_dir,
            lora["unet"],
            lora.get("text_encoder"),
            unet_lora_config=configs["unet"],
            text_encoder_lora_config=configs.get("text_encoder"),
            metadata={k: v for k, v in metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))},
        )
        kohya_path = save_safetensors(kohya, final_dir / f"{self.cfg.output.name}.safetensors", metadata=metadata)
        return [Path(diffusers_path), Path(kohya_path)]

    @staticmethod
    def _lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors in PEFT naming, fp32 on the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items()}
