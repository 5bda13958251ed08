"""The small interface a training method implements; the shared loop calls nothing else."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .checkpoints import copy_into_parameters
from .config import RunConfig
from .models import BaseModel


class TrainingMethod:
    """Base class: freeze everything, train what a subclass unfreezes, export what it knows.

    Hooks, in the order the loop calls them: ``setup`` -> ``parameter_groups`` -> per step
    ``captions``/``encode_text`` and ``loss`` -> ``after_step`` -> ``save``.
    """

    name = "base"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.models: BaseModel | None = None

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models: BaseModel) -> None:
        """Freeze every weight; subclasses then add or unfreeze what they train."""
        self.models = models
        for module in (models.unet, models.vae, models.text_encoder):
            module.requires_grad_(False)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Name -> module for every model holding trainable weights (prepared, accumulated, saved)."""
        raise NotImplementedError

    def unet_and_text_encoder(self, with_text_encoder: bool) -> dict[str, torch.nn.Module]:
        """The UNet, plus the text encoder when it trains too: what LoRA and DreamBooth train."""
        assert self.models is not None, "setup() must run first"
        modules = {"unet": self.models.unet}
        if with_text_encoder:
            modules["text_encoder"] = self.models.text_encoder
        return modules

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; the default puts every trainable weight at ``learning_rate``."""
        params = [p for m in self.trained_modules().values() for p in m.parameters() if p.requires_grad]
        return [{"name": self.name, "params": params, "lr": learning_rate}]

    def class_records(self, accelerator) -> list | None:
        """Prior-preservation examples paired with each instance example (data.sources.Record list)."""
        return None

    def checkpoint_objects(self, accelerator) -> list[Any]:
        """Extra stateful objects (state_dict/load_state_dict) saved and restored with checkpoints, e.g. EMA."""
        return []

    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of ``module``: only its trainable tensors, by default."""
        return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, module_name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back (on resume) what ``trainable_state_dict`` saved; by default by parameter name."""
        copy_into_parameters(module_name, module, tensors)

    # -- per step -----------------------------------------------------------------------------
    def captions(self, captions: list[str]) -> list[str]:
        """Rewrite captions before tokenizing (e.g. expand a multi-vector token)."""
        return captions

    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token conditioning for the UNet: the text encoder's last hidden state."""
        return text_encoder(input_ids, return_dict=False)[0]

    def loss(self, per_sample: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Reduce per-sample (already SNR-weighted) losses to the loss to minimise, plus scalars to log."""
        return per_sample.mean(), {}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step with the new global step (EMA update, restore frozen rows)."""

    def sampling_weights(self, modules: dict[str, torch.nn.Module]) -> AbstractContextManager:
        """Weights to sample validation images with (e.g. EMA swapped in, and back out after)."""
        return nullcontext()

    def export_weights(self, modules: dict[str, torch.nn.Module]) -> AbstractContextManager:
        """Weights to export (e.g. EMA); defaults to the sampling choice."""
        return self.sampling_weights(modules)

    # -- export -------------------------------------------------------------------------------
    def save(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """Write the method's export files into ``final_dir``; return their paths."""
        raise NotImplementedError

    def trigger(self) -> str | None:
        """The words that call up what was learned, for the model card and metadata."""
        return self.cfg.data.instance_prompt
